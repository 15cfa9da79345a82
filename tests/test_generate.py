"""generate(): batching, KV cache, stopping and sampling, checked against plain full forward passes."""
import pytest
import torch

from model import ModelConfig, Transformer, generate, sample

V = 101


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind="llama3", seed=0):
    cfg = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama3":
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    else:  # Qwen3-like: q/k norm, and biases to exercise those paths too
        cfg.update(qk_norm=True, attention_bias=True, head_dim=32)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: peaked, varied outputs and no near-ties
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.3 if p.dim() > 1 else 0.1)
    return model


PROMPTS = [[5, 17, 3, 99, 42, 7, 8, 1], [60, 2], [11, 12, 13, 14, 15], [77]]


def _full_logits(model, prompt, new_tokens):
    """Logits of one unpadded sequence by a plain forward pass: (len(prompt) + n, V)."""
    seq = torch.tensor([prompt + new_tokens])
    return model(seq)[0].float()


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_batched_left_padded_greedy_equals_one_at_a_time(kind):
    model = _model(kind)
    batched = generate(model, PROMPTS, 16, temperature=0)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], 16, temperature=0)
        assert torch.equal(batched.tokens[i], alone.tokens[0]), i
        assert torch.allclose(batched.logprobs[i], alone.logprobs[0], atol=1e-5)
    assert batched.mask.all() and not batched.stopped.any()
    assert len(set(map(tuple, batched.tokens.tolist()))) == len(PROMPTS)  # outputs differ: not a trivial model


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
def test_cached_decoding_equals_full_forward(kind):
    """Step-by-step cached logits (batched, left-padded) match a full forward pass over each unpadded sequence."""
    from model import left_pad
    model = _model(kind)
    prompt, key_mask = left_pad(PROMPTS, 0, "cpu")
    B, P = prompt.shape
    steps = 6
    new = torch.randint(0, V, (B, steps), generator=torch.Generator().manual_seed(3))
    full_mask = torch.cat([key_mask, torch.ones(B, steps, dtype=torch.bool)], 1)
    model.setup_cache(B, P + steps)
    try:
        cached = [model.decode(prompt, key_mask, cache_start=0)]
        for s in range(steps - 1):
            cached.append(model.decode(new[:, s:s + 1], full_mask[:, :P + s + 1], cache_start=P + s))
    finally:
        model.setup_cache(None)
    cached = torch.stack(cached, 1)  # (B, steps, V): logits predicting new[:, s]
    for i, p in enumerate(PROMPTS):
        ref = _full_logits(model, p, new[i, :steps - 1].tolist())[len(p) - 1:]
        assert (cached[i] - ref).abs().max().item() < 1e-4, i
    assert all(layer.self_attn.kv_cache is None for layer in model.layers)  # cache freed


def test_cached_chunks_without_padding_equal_full_forward():
    """Without a key_mask the cached prefix counts as real tokens: a chunk after it sits at the right positions
    and sees the prefix but not its own future."""
    model = _model()
    x = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(4))
    model.setup_cache(2, 10)
    try:
        chunks = [model.lm_head(model.hidden_states(x[:, a:b], cache_start=a)) for a, b in [(0, 4), (4, 7), (7, 8)]]
    finally:
        model.setup_cache(None)
    assert (torch.cat(chunks, 1) - model(x)[:, :8]).abs().max().item() < 1e-4


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_log_softmax_of_full_forward(temperature):
    model = _model()
    g = generate(model, PROMPTS, 10, temperature=temperature, generator=torch.Generator().manual_seed(0))
    T = temperature or 1.0  # greedy logprobs are under T = 1
    for i, p in enumerate(PROMPTS):
        new = g.tokens[i].tolist()
        logits = _full_logits(model, p, new)[len(p) - 1:-1]  # (N, V), row s predicts new[s]
        ref = torch.log_softmax(logits / T, -1).gather(-1, g.tokens[i][:, None]).squeeze(-1)
        assert g.logprobs.dtype == torch.float32
        assert (g.logprobs[i] - ref).abs().max().item() < 1e-4
        if temperature == 0:
            assert torch.equal(g.tokens[i], logits.argmax(-1))


def test_stop_ids_stop_rows_independently():
    model = _model()
    free = generate(model, PROMPTS, 12, temperature=0, pad_id=-1)
    # stop ids: row 0's 3rd token, and row 2's 6th token (chosen from the free run so the stops really happen)
    stops = (free.tokens[0, 2].item(), free.tokens[2, 5].item())
    got = generate(model, PROMPTS, 12, temperature=0, stop_ids=stops, pad_id=-1)
    for i in range(len(PROMPTS)):
        row = free.tokens[i].tolist()
        first = next((s for s, t in enumerate(row) if t in stops), None)
        n = len(row) if first is None else first + 1
        assert got.tokens[i, :n].tolist() == row[:n]  # identical up to and including the stop token
        assert got.tokens[i, n:].eq(-1).all() and got.mask[i, :n].all() and not got.mask[i, n:].any()
        assert got.logprobs[i, n:].eq(0).all() and torch.allclose(got.logprobs[i, :n], free.logprobs[i, :n], atol=1e-5)
        assert got.stopped[i].item() == (first is not None)
    assert got.stopped[0] and got.stopped[2]
    assert got.mask[0].sum() == 3


def test_finished_rows_leave_the_batch(monkeypatch):
    model = _model()
    free = generate(model, PROMPTS, 8, temperature=0)
    stop = free.tokens[1, 0].item()  # row 1 stops at once
    sizes = []
    real_decode = model.decode
    monkeypatch.setattr(model, "decode", lambda tok, *a, **k: sizes.append(tok.shape[0]) or real_decode(tok, *a, **k))
    got = generate(model, PROMPTS, 8, temperature=0, stop_ids=[stop])
    assert sizes[0] == 4  # prefill
    assert sizes[1] == 4 - sum(r[0] == stop for r in free.tokens.tolist())  # rows that stopped at step 0 left
    assert sizes == sorted(sizes, reverse=True) and len(sizes) == 8
    assert got.stopped[1] and got.mask[1].sum() == 1


def test_stop_on_last_step_counts_as_stopped():
    model = _model()
    free = generate(model, [PROMPTS[0]], 5, temperature=0)
    last = free.tokens[0, -1].item()
    if last in free.tokens[0, :-1].tolist():
        pytest.skip("the greedy continuation repeats its last token earlier")
    got = generate(model, [PROMPTS[0]], 5, temperature=0, stop_ids=[last])
    assert got.stopped.tolist() == [True] and got.mask.all()


def test_sampling_draws_from_the_whole_tempered_distribution():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3])).expand(4000, 4)
    tokens, logp = sample(logits, 1.0, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=4).float()
    assert (counts / counts.sum() - torch.tensor([0.05, 0.5, 0.15, 0.3])).abs().max() < 0.03
    assert torch.allclose(logp, torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))[tokens], atol=1e-6)
    # temperature sharpens: T = 0.5 squares the probabilities before renormalising
    p2 = torch.tensor([0.05, 0.5, 0.15, 0.3]) ** 2
    tok_t, logp_t = sample(logits[:1], 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(logp_t.exp(), (p2 / p2.sum())[tok_t], rtol=1e-5)


def test_a_seed_reproduces_its_samples():
    model = _model()
    a = generate(model, PROMPTS, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate(model, PROMPTS, 8, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = generate(model, PROMPTS, 8, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("args, match", [
    (dict(prompts=[]), "prompts"),
    (dict(prompts=[[1], []]), "prompts"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(prompts=[[1, V]]), "out of range"),
])
def test_bad_arguments(args, match):
    kw = dict(prompts=[[1, 2]], max_new_tokens=4)
    kw.update(args)
    with pytest.raises(ValueError, match=match):
        generate(_model(), kw.pop("prompts"), kw.pop("max_new_tokens"), **kw)


def test_bf16_model_generates_float32_logprobs():
    model = _model().to(torch.bfloat16)
    g = generate(model, PROMPTS, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert g.logprobs.dtype == torch.float32 and torch.isfinite(g.logprobs).all() and (g.logprobs <= 0).all()
    assert g.tokens.dtype == torch.long and g.mask.all()
