"""train.py's command line: strict parsing, every flag's domain checked before any work, and a --help that shows
each flag's default and the preset's value."""
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]

# One value outside each flag's domain (or not of its type).
BAD = {
    "preset": "huge", "model_dir": "{tmp}", "tokenizer": "{tmp}/no_tokenizer.json", "dtype": "float16",
    "dataset": "apps", "data_path": "{tmp}/missing.jsonl", "drop_broken_tasks": "maybe",
    "algo": "reinforce", "critic": "probes", "advantage": "gae", "kl_placement": "both", "kl_coef": "-0.01",
    "kl_target": "-1", "clip_eps": "0", "lr": "0", "critic_lr": "-1e-5", "warmup_steps": "-1", "ppo_epochs": "0",
    "minibatch_size": "0", "micro_batch_size": "0", "logprob_chunk": "0",
    "steps": "-3", "tasks_per_step": "0", "samples_per_task": "0", "max_turns": "0", "max_new_tokens": "0",
    "temperature": "0", "gen_batch_size": "0",
    "time_weight": "-1", "sandbox_workers": "-2", "test_timeout": "0", "lora_rank": "-1", "fsdp": "on",
    "eval_tasks": "-59", "eval_samples": "0", "eval_temperature": "0", "eval_episodes": "0",
    "out_dir": "", "save_every": "-1", "resume": "maybe", "overwrite": "2",
    "seed": "1.5", "warmstart_steps": "-1", "cache_dir": "",
}
# Flags that take any value, and why.
EXEMPT = {"instruction": "free text appended to the prompt; '' means none"}


def refusal(argv, capsys) -> str:
    """parse_config's error line for argv; it must exit with status 2 and print only that line."""
    with pytest.raises(SystemExit) as info:
        train.parse_config(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2, argv
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_every_flag_of_config_has_a_bad_value_or_an_exemption():
    names = {f.name for f in dataclasses.fields(train.Config)}
    assert names == set(BAD) | set(EXEMPT), "a Config field needs a bad value in BAD or a reason in EXEMPT"
    assert not set(BAD) & set(EXEMPT)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_is_refused_in_one_line_naming_the_flag_and_value(name, tmp_path, capsys):
    bad = BAD[name].format(tmp=tmp_path)
    line = refusal([f"--{name}={bad}"], capsys)  # '=': argparse reads "-1e-5" after a space as a flag
    assert " error: " in line and f"--{name}" in line, line
    shown = {bad, repr(bad)}
    try:
        shown.add(str(float(bad)))  # "0" is reported as the float 0.0
    except ValueError:
        pass
    assert any(s in line for s in shown if s), line


def test_values_at_the_edge_of_each_domain_are_accepted(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tasks.jsonl").write_text("")
    cfg = train.parse_config([
        "--sandbox_workers", "0", "--eval_tasks", "0", "--save_every", "0", "--kl_coef", "0", "--kl_target", "0",
        "--warmup_steps", "0", "--time_weight", "0", "--steps", "1", "--lora_rank", "0", "--seed", "-7",
        "--instruction", "", "--model_dir", str(tmp_path), "--warmstart_steps", "0", "--dataset", "tasks",
        "--data_path", str(tmp_path / "tasks.jsonl"), "--tokenizer", "bytes"])
    assert (cfg.sandbox_workers, cfg.kl_coef, cfg.steps, cfg.seed, cfg.instruction) == (0, 0.0, 1, -7, "")


@pytest.mark.parametrize("text,value", [("true", True), ("Yes", True), ("1", True), ("false", False),
                                        ("NO", False), ("0", False)])
def test_booleans_parse_strictly(text, value):
    assert train.parse_config(["--fsdp", text]).fsdp is value


def test_a_bare_boolean_flag_means_true():
    assert train.parse_config(["--drop_broken_tasks", "--fsdp"]).drop_broken_tasks is True
    assert train.parse_config([]).drop_broken_tasks is False


def test_the_preset_fills_defaults_and_flags_win():
    tiny = train.parse_config([])
    assert (tiny.steps, tiny.algo, tiny.warmstart_steps) == (24, "expert_iteration", 1200)  # PRESETS["tiny"]
    assert train.parse_config(["--steps", "3"]).steps == 3
    big = train.parse_config(["--preset", "llama-3.1-8b", "--model_dir", "", "--warmstart_steps", "5"])
    assert (big.lora_rank, big.fsdp, big.dtype) == (64, True, "bfloat16")
    assert train.parse_config(["--algo", "grpo"]).kl_placement == "loss"  # GRPO's KL goes in the loss


def test_cross_flag_rules_name_the_flag(tmp_path, capsys):
    assert "--data_path" in refusal(["--dataset", "stdio"], capsys)
    line = refusal(["--algo", "dr_grpo", "--kl_placement", "reward"], capsys)
    assert "--kl_placement" in line and "dr_grpo" in line
    assert train.parse_config(["--algo", "grpo", "--kl_placement", "reward", "--kl_coef", "0"]).kl_coef == 0
    assert "--warmstart_steps" in refusal(["--warmstart_steps", "0"], capsys)  # nothing to start from
    (tmp_path / "config.json").write_text("{}")
    assert "no tokenizer of its own" in refusal(["--model_dir", str(tmp_path)], capsys)
    assert train.parse_config(["--model_dir", str(tmp_path), "--tokenizer", "bytes"]).tokenizer == "bytes"


def test_a_prefix_of_a_flag_is_refused(capsys):
    assert "--samples" in refusal(["--samples", "4"], capsys)
    assert "--preset" in refusal(["--preset"], capsys)  # read first, for --help's preset values


def test_help_shows_groups_defaults_and_the_presets_values(capsys):
    with pytest.raises(SystemExit) as info:
        train.parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal's width
    assert info.value.code == 0
    assert "(default: 100; tiny preset: 24)" in text  # --steps
    assert "(default: 'ppo'; tiny preset: 'expert_iteration')" in text
    assert "(default: 1.0)" in text  # --gamma, which the tiny preset leaves alone
    assert "--algo {ppo,grpo,dr_grpo,expert_iteration}" in text
    for title in ("model and data:", "algorithm:", "rollouts:", "rewards and sandbox:", "LoRA and distribution:"):
        assert title in text
    with pytest.raises(SystemExit):
        train.parse_config(["--preset", "llama-3.1-8b", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0; llama-3.1-8b preset: 64)" in text and "tiny preset: 24" not in text


# The issue's cases, each in a real process: exit status 2 in seconds, one line, and nothing written.
ISSUE_CASES = [["--samples_per_task", "0"], ["--tasks_per_step", "0"], ["--gen_batch_size", "0"],
               ["--micro_batch_size", "0"], ["--max_turns", "0"], ["--eval_samples", "0"],
               ["--sandbox_workers", "-2"], ["--steps", "-3"], ["--warmstart_steps", "-1"], ["--eval_tasks", "-59"],
               ["--test_timeout", "0"], ["--resume", "ture"], ["--fsdp", "on"],
               ["--temperature", "0"], ["--samples", "4"], ["--dataset", "tasks"]]


@pytest.mark.parametrize("argv", ISSUE_CASES, ids=" ".join)
def test_train_py_refuses_the_issues_bad_value_at_once(argv, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv, "--out_dir", str(tmp_path / "out"),
                           "--cache_dir", str(tmp_path / "cache")], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == "" and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("train.py: error:") and argv[0] in lines[0], lines
    assert time.time() - start < 60  # before any work: no warm start, no sandbox, no model (importing torch)
    assert list(tmp_path.iterdir()) == []  # no out_dir, no cache
