"""evaluate.py as a command: run in a subprocess on tiny checkpoints (a random model: it never passes, so
every episode uses all its turns), and on bad input (exit status 2, one line that names the flag and its
value)."""
import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import evaluate
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parent.parent
GOOD_TASK = {"task_id": "t1", "prompt": "Write f(x) that returns x + 1.", "entry_point": "f",
             "private_tests": [{"kind": "call", "call": "f(1)", "expected": "2"}]}


def tiny_checkpoint(path: Path, vocab_size: int) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    Transformer(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    """Vocabulary of the byte-level tokenizer (264 ids); no tokenizer file in the folder."""
    return tiny_checkpoint(tmp_path_factory.mktemp("bytes") / "policy", 264)


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory, shared_data) -> Path:
    """Llama 3's vocabulary (128256 ids, specials included), with the real tokenizer.model in the folder."""
    path = tiny_checkpoint(tmp_path_factory.mktemp("llama3") / "policy", 128256)
    shutil.copy(shared_data / "llama3-tokenizer" / "tokenizer.model", path / "tokenizer.model")
    return path


def run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def fails_with(result: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit status 2, nothing on stdout, one line on stderr that holds every part; returns that line."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("evaluate.py: error: "), line
    for part in parts:
        assert part in line, line
    return line


def test_help_shows_every_flag_and_where_mbpp_comes_from(tmp_path):
    result = run(["--help"], tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for action in evaluate.build_parser()._actions:
        assert action.option_strings[-1] in text
    assert "'' = ../shared/data/mbpp/mbpp.jsonl relative to the repository root" in text
    assert "(default: 384)" in text and "(default: None)" not in text


@pytest.mark.parametrize("flags, parts", [
    ([], ["the following arguments are required: --model_dir, --dataset"]),
    (["--samples", "0"], ["argument --samples: must be at least 1, got 0"]),
    (["--episodes", "-1"], ["argument --episodes: must be at least 1, got -1"]),
    (["--max_turns", "0"], ["argument --max_turns: must be at least 1, got 0"]),
    (["--max_new_tokens", "0"], ["argument --max_new_tokens: must be at least 1, got 0"]),
    (["--gen_batch_size", "0"], ["argument --gen_batch_size: must be at least 1, got 0"]),
    (["--limit", "-59"], ["argument --limit: must be at least 0, got -59"]),
    (["--workers", "-2"], ["argument --workers: must be at least 0, got -2"]),
    (["--timeout", "0"], ["argument --timeout: must be a number of seconds above 0, got 0.0"]),
    (["--timeout", "nan"], ["argument --timeout: must be a number of seconds above 0, got nan"]),
    (["--temperature", "-1"], ["argument --temperature: must be at least 0, got -1.0"]),
    (["--temperature", "0", "--samples", "4"], ["argument --temperature: 0 (greedy)", "--samples 4"]),
    (["--samples", "x"], ["argument --samples: invalid int value: 'x'"]),
    (["--sample", "3"], ["unrecognized arguments: --sample 3"]),  # no prefixes of flags
    (["--dataset", "humaneva"], ["argument --dataset: invalid choice: 'humaneva'"]),
    (["--dtype", "fp8"], ["argument --dtype: invalid choice: 'fp8'"]),
    (["--dataset", "tasks"], ["argument --data_path: --dataset tasks needs a data file, got none"]),
    (["--dataset", "synthetic", "--data_path", "x"], ["argument --data_path: --dataset synthetic reads no"]),
    (["--data_path", "missing.jsonl"], ["argument --data_path: 'missing.jsonl' is not a file"]),
    (["--out", "."], ["argument --out: '.' is a folder"]),
])
def test_bad_flags_fail_at_once_naming_the_flag(byte_model, tmp_path, flags, parts):
    base = ["--model_dir", byte_model, "--tokenizer", "bytes", "--dataset", "humaneval"] if flags else []
    fails_with(run([*base, *flags], tmp_path), *parts)


def test_bad_model_dir_and_device(byte_model, tmp_path):
    fails_with(run(["--model_dir", tmp_path, "--dataset", "mbpp"], tmp_path),
               f"argument --model_dir: '{tmp_path}' is not a checkpoint folder (no config.json)")
    fails_with(run(["--model_dir", byte_model, "--tokenizer", "bytes", "--dataset", "humaneval", "--limit",
                    "1", "--device", "gpu"], tmp_path), "argument --device: 'gpu' is not a device")


def test_data_errors_name_the_file_line_task_and_field(byte_model, tmp_path):
    path = tmp_path / "tasks.jsonl"
    good = json.dumps(GOOD_TASK)
    path.write_text(good + "\n" + good[:-20] + "\n")          # a truncated line
    fails_with(run(["--model_dir", byte_model, "--dataset", "tasks", "--data_path", path], tmp_path),
               f"argument --dataset tasks: {path} line 2: not valid JSON")
    assert_test = {**GOOD_TASK, "task_id": "t2",
                   "private_tests": [{"kind": "assert", "code": "assert f(1) = 2"}]}
    path.write_text(good + "\n" + json.dumps(assert_test) + "\n")
    fails_with(run(["--model_dir", byte_model, "--dataset", "tasks", "--data_path", path], tmp_path),
               f"{path} line 2 (task 't2'): field 'private_tests'[0]: ", "field 'code' is not valid Python")


def test_tokenizer_errors_name_the_flag(byte_model, tmp_path, shared_data):
    common = ["--model_dir", byte_model, "--dataset", "humaneval", "--limit", "1"]
    fails_with(run(common, tmp_path), "argument --tokenizer: '': no tokenizer.json or tokenizer.model in")
    llama3 = shared_data / "llama3-tokenizer" / "tokenizer.model"
    fails_with(run([*common, "--tokenizer", llama3], tmp_path),
               "argument --tokenizer: ", "tokenizer.model has ids up to 128255", "config.json has vocab_size=264")


def read_result(cwd: Path) -> dict:
    [out] = list((cwd / "out" / "eval").glob("*.json"))
    return json.loads(out.read_text())


def test_evaluates_a_checkpoint_with_its_own_tokenizer(llama3_model, tmp_path):
    """Two HumanEval tasks, 2 samples and 2 episodes each; the default --out; no file but the result."""
    before = sorted(p.name for p in llama3_model.iterdir())
    result = run(["--model_dir", llama3_model, "--dataset", "humaneval", "--limit", "2", "--samples", "2",
                  "--max_new_tokens", "4", "--temperature", "1", "--workers", "1"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "evaluate: episodes 2/2 tasks  elapsed" in result.stderr and "tokenizer llama3" in result.stderr
    out = read_result(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        [f"out/eval/{Path(out['args']['out']).name}"]
    assert sorted(p.name for p in llama3_model.iterdir()) == before      # no model copy, nothing added
    assert [r["task_id"] for r in out["per_task"]] == ["HumanEval/0", "HumanEval/1"]
    # a random model writes no code block: every episode goes to its third turn, nothing passes
    counts = [(r["n"], r["c"], r["episodes"], r["final_c"], r["turns"]) for r in out["per_task"]]
    assert counts == [(2, 0, 2, 0, 6)] * 2
    assert out["metrics"] == {"pass@1": 0.0, "pass@2": 0.0, "1@3": 0.0, "turn1_pass": 0.0, "repair_rate": 0.0,
                              "mean_turns": 3.0, "tasks": 2}
    table = result.stdout.splitlines()
    assert table[0] == "humaneval: 2 tasks, temperature 1.0, 3.00 turns per episode on average"
    assert [line.split()[0] for line in table[1:6]] == ["pass@1", "pass@2", "turn", "1@3", "repairs"]
    assert table[-1] == f"result: {out['args']['out']}"


def test_tasks_file_with_one_turn_and_the_byte_tokenizer(byte_model, tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps({**GOOD_TASK, "task_id": t}) for t in ("a", "b", "c")) + "\n")
    result = run(["--model_dir", byte_model, "--tokenizer", "bytes", "--dataset", "tasks", "--data_path",
                  path, "--limit", "2", "--max_turns", "1", "--max_new_tokens", "4", "--out", tmp_path / "r.json",
                  "--workers", "1"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    assert [r["task_id"] for r in out["per_task"]] == ["a", "b"]
    assert set(out["metrics"]) == {"pass@1", "1@1", "turn1_pass", "mean_turns", "tasks"}
    assert out["metrics"]["mean_turns"] == 1.0


def test_benchmarks_are_whole():
    """All 164 HumanEval tasks and MBPP's test split, tasks 11-510 (Austin et al. 2021)."""
    args = Namespace(data_path="", limit=0, seed=0)
    humaneval = evaluate.benchmark_tasks(Namespace(**vars(args), dataset="humaneval"))
    assert [t.task_id for t in humaneval] == [f"HumanEval/{i}" for i in range(164)]
    mbpp = evaluate.benchmark_tasks(Namespace(**vars(args), dataset="mbpp"))
    assert [t.task_id for t in mbpp] == [f"MBPP/{i}" for i in range(11, 511)]
