"""Loss table L(S) and cost model against direct per-subset computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.costmodel import CostModel, parse_applications, parse_profile
from coordinator.losstable import LossTable, ScoreTable, load_gates, load_score_table
from coordinator.smo import mask_members


def random_table(rng, n_experts=5, n_examples=9, max_targets=5):
    lengths = rng.integers(1, max_targets + 1, n_examples)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    probs = rng.dirichlet(np.ones(40), size=(offsets[-1], n_experts))[..., 0]
    logprobs = np.log(probs).astype(np.float32)
    experts = tuple(f"expert{i}" for i in range(n_experts))
    return ScoreTable(logprobs, offsets, experts)


def direct_loss(table, gates, mask, top_k=None):
    """The loss written out with Python loops, one example and target at a time."""
    members = mask_members(mask)
    total = 0.0
    for example in range(table.n_examples):
        chosen = members
        if top_k is not None:
            chosen = sorted(members, key=lambda n: (-gates[example, n], n))[:top_k]
        norm = sum(gates[example, n] for n in chosen)
        for row in range(table.offsets[example], table.offsets[example + 1]):
            mixture = sum(gates[example, n] / norm * math.exp(table.logprobs[row, n]) for n in chosen)
            total -= math.log(mixture)
    return total / table.n_examples


@pytest.mark.parametrize("top_k", [None, 1, 2, 4])
def test_loss_table_matches_direct_loss(top_k):
    rng = np.random.default_rng(top_k or 0)
    table = random_table(rng)
    gates = rng.dirichlet(np.ones(5), size=table.n_examples)
    # Ties in gate values must go to the lower expert index, as at inference.
    gates[1, :] = 0.2
    masks = np.arange(1, 1 << 5, dtype=np.uint64)

    single = LossTable(table, gates, top_k=top_k)
    batched = LossTable(table, gates, top_k=top_k)
    single_losses = np.array([single.loss(int(mask)) for mask in masks])
    batched_losses = batched.losses(masks)
    expected = np.array([direct_loss(table, gates, int(mask), top_k) for mask in masks])

    np.testing.assert_allclose(single_losses, expected, rtol=1e-10)
    np.testing.assert_allclose(batched_losses, expected, rtol=1e-10)


def test_loss_table_uniform_gates_default():
    rng = np.random.default_rng(1)
    table = random_table(rng, n_experts=3)
    uniform = np.full((table.n_examples, 3), 1 / 3)

    losses = LossTable(table)

    for mask in range(1, 8):
        assert losses.loss(mask) == pytest.approx(direct_loss(table, uniform, mask), rel=1e-10)


def test_loss_table_counts_and_memoizes_evaluations():
    table = random_table(np.random.default_rng(2))
    losses = LossTable(table)

    first = losses.loss(0b101)
    again = losses.loss(0b101)
    losses.losses(np.array([0b101, 0b11, 0b11], dtype=np.uint64))

    assert first == again
    assert losses.evaluations == 2


def test_loss_table_batched_underflow_uses_log_space():
    # Expert 1's probabilities are e^-800 below expert 0's, so exp space underflows
    # to 0 for the subset {1}; the exact fallback must still give the right loss.
    logprobs = np.array([[-0.1, -800.0], [-0.2, -900.0]], dtype=np.float64)
    table = ScoreTable(logprobs, np.array([0, 1, 2]), ("a", "b"))

    losses = LossTable(table).losses(np.array([0b10, 0b11], dtype=np.uint64))

    assert losses[0] == pytest.approx((800.0 + 900.0) / 2)
    assert np.isfinite(losses[1])


def test_loss_table_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    table = random_table(rng)
    path = tmp_path / "scores.npz"
    np.savez(path, logprobs=table.logprobs, offsets=table.offsets, experts=np.array(table.experts),
             fingerprints=np.array(["f"] * 5), example_ids=np.array([f"x/{i}" for i in range(table.n_examples)]),
             meta_json=np.array('{"prompt_format": "plain"}'))
    gates = rng.dirichlet(np.ones(5), size=table.n_examples)
    np.save(tmp_path / "gates.npy", gates)

    loaded = load_score_table(path)
    loaded_gates = load_gates(tmp_path / "gates.npy", loaded.n_examples, loaded.n_experts)

    assert list(loaded.experts) == list(table.experts)
    assert loaded.meta == {"prompt_format": "plain"}
    assert LossTable(loaded, loaded_gates).loss(0b111) == pytest.approx(direct_loss(table, gates, 0b111))


def test_load_score_table_rejects_bad_offsets(tmp_path):
    path = tmp_path / "scores.npz"
    np.savez(path, logprobs=np.zeros((4, 2), dtype=np.float32), offsets=np.array([0, 3]), experts=np.array(["a", "b"]),
             fingerprints=np.array(["fa", "fb"]), example_ids=np.array(["x0"]), meta_json=np.array("{}"))

    with pytest.raises(ValueError, match="offsets"):
        load_score_table(path)


def test_load_score_table_missing_key(tmp_path):
    path = tmp_path / "scores.npz"
    np.savez(path, logprobs=np.zeros((4, 2), dtype=np.float32), offsets=np.array([0, 4]))

    with pytest.raises(ValueError, match="lacks keys.*experts"):
        load_score_table(path)


def test_load_gates_rejects_wrong_shape(tmp_path):
    np.save(tmp_path / "gates.npy", np.full((3, 2), 0.5))

    with pytest.raises(ValueError, match="does not match"):
        load_gates(tmp_path / "gates.npy", 4, 2)


def test_loss_table_rejects_non_positive_gates():
    table = random_table(np.random.default_rng(4), n_experts=2)
    gates = np.full((table.n_examples, 2), 0.5)
    gates[0, 1] = 0.0

    with pytest.raises(ValueError, match="> 0"):
        LossTable(table, gates)


LENGTHS = [32, 128, 512, 2048]


def profile_entry(name, prefill, step_base, step_slope, joules_scale):
    return {
        "name": name,
        "meter": {"name": "tegrastats"},
        "prefill": {"lengths": LENGTHS,
                    "seconds": {"median": [prefill * n / 32 for n in LENGTHS], "p95": [prefill * n / 30 for n in LENGTHS]},
                    "joules": {"median": [joules_scale * prefill * n / 32 for n in LENGTHS],
                               "p95": [joules_scale * prefill * n / 30 for n in LENGTHS]}},
        "step": {"lengths": LENGTHS,
                 "seconds": {"median": [step_base + step_slope * n for n in LENGTHS],
                             "p95": [1.1 * (step_base + step_slope * n) for n in LENGTHS]},
                 "joules": {"median": [joules_scale * (step_base + step_slope * n) for n in LENGTHS],
                            "p95": [joules_scale * 1.1 * (step_base + step_slope * n) for n in LENGTHS]}},
    }


def make_profile(n_experts=4, seed=0, gate_seconds=0.01):
    rng = np.random.default_rng(seed)
    experts = [profile_entry(f"expert{i}", rng.uniform(0.01, 0.1), rng.uniform(0.01, 0.05),
                             rng.uniform(1e-6, 3e-5), rng.uniform(5, 30)) for i in range(n_experts)]
    return {"format": "moe2-profile", "version": 1, "experts": experts,
            "gate": {"seconds": {"median": gate_seconds, "p95": 2 * gate_seconds}}}


def direct_delay(profile, names, app, mask, gate_seconds):
    """delay(S) from the definition, one prompt length and one step at a time."""
    members = [names[i] for i in mask_members(mask)]
    total = 0.0
    for length, weight in zip(app.prompt_lengths, app.weights):
        total += weight * max(profile.experts[n].prefill_seconds.at(np.array([length]))[0] for n in members)
        for t in range(1, app.output_tokens):
            total += weight * max(profile.experts[n].step_seconds.at(np.array([length + t]))[0] for n in members)
    return total + gate_seconds


def direct_energy(profile, names, app, mask, top_k=None):
    per_expert = []
    for n in [names[i] for i in mask_members(mask)]:
        costs = profile.experts[n]
        energy = 0.0
        for length, weight in zip(app.prompt_lengths, app.weights):
            energy += weight * costs.prefill_joules.at(np.array([length]))[0]
            for t in range(1, app.output_tokens):
                energy += weight * costs.step_joules.at(np.array([length + t]))[0]
        per_expert.append(energy)
    per_expert.sort()
    return sum(per_expert[-top_k:] if top_k else per_expert)


APPLICATIONS = {"applications": [
    {"name": "chat", "prompt_lengths": [40, 300, 3000], "prompt_length_weights": [1, 2, 1],
     "output_tokens": 12, "t_max": 2.0},
    {"name": "docs", "prompt_length_distribution": {"kind": "lognormal", "median": 400, "sigma": 0.7, "max": 4096},
     "output_tokens": 5, "t_max": 3.0},
]}


@pytest.mark.parametrize("top_k", [None, 2])
def test_cost_model_matches_definition(top_k):
    profile = parse_profile(make_profile())
    names = list(profile.experts)
    applications = parse_applications(APPLICATIONS)
    model = CostModel(profile, names, applications, top_k=top_k)
    masks = np.arange(1, 16, dtype=np.uint64)

    for app in applications:
        delays = model.delays(app.name, masks)
        energies = model.energies(app.name, masks)
        for index, mask in enumerate(masks.tolist()):
            expected_delay = direct_delay(profile, names, app, mask, 0.01)
            expected_energy = direct_energy(profile, names, app, mask, top_k)
            assert model.delay(app.name, mask) == pytest.approx(expected_delay, rel=1e-12)
            assert delays[index] == pytest.approx(expected_delay, rel=1e-12)
            assert model.energy(app.name, mask) == pytest.approx(expected_energy, rel=1e-12)
            assert energies[index] == pytest.approx(expected_energy, rel=1e-12)


def test_cost_model_constraints_are_monotone():
    profile = parse_profile(make_profile(n_experts=5, seed=3))
    model = CostModel(profile, list(profile.experts), parse_applications(APPLICATIONS), top_k=2)

    for constraint in model.constraints(energy_max=10.0):
        for mask in range(1, 32):
            for expert in mask_members(mask):
                child = mask & ~(1 << expert)
                if child:
                    assert constraint.value(child) <= constraint.value(mask) + 1e-12, constraint.name


def test_curve_extrapolates_last_slope():
    profile = parse_profile(make_profile(n_experts=1))
    curve = profile.experts["expert0"].step_seconds

    beyond = curve.at(np.array([4096.0]))[0]
    below = curve.at(np.array([1.0]))[0]

    slope = (curve.values[-1] - curve.values[-2]) / (curve.lengths[-1] - curve.lengths[-2])
    assert beyond == pytest.approx(curve.values[-1] + slope * 2048)
    assert below == curve.values[0]


def test_cost_model_p95_statistic_is_slower():
    data = make_profile()
    names = [f"expert{i}" for i in range(4)]
    applications = parse_applications(APPLICATIONS)

    median = CostModel(parse_profile(data, "median"), names, applications)
    p95 = CostModel(parse_profile(data, "p95"), names, applications)

    assert p95.delay("chat", 0b1111) > median.delay("chat", 0b1111)


def test_cost_model_missing_expert_profile():
    profile = parse_profile(make_profile(n_experts=2))

    with pytest.raises(ValueError, match="no profile for expert7"):
        CostModel(profile, ["expert0", "expert7"], parse_applications(APPLICATIONS))


def test_cost_model_unmetered_energy_budget():
    data = make_profile(n_experts=2)
    data["experts"][1]["prefill"]["joules"] = {"median": None, "p95": None}
    model = CostModel(parse_profile(data), ["expert0", "expert1"], parse_applications(APPLICATIONS))

    assert len(model.constraints(energy_max=None)) == 2
    with pytest.raises(ValueError, match="no energy profile for expert1"):
        model.constraints(energy_max=5.0)


@pytest.mark.parametrize("entry, message", [
    ({"name": "a", "output_tokens": 4, "t_max": 1.0}, "exactly one of prompt_lengths"),
    ({"name": "a", "prompt_lengths": [0], "output_tokens": 4, "t_max": 1.0}, "token counts > 0"),
    ({"name": "a", "prompt_lengths": [10], "output_tokens": 0, "t_max": 1.0}, "output_tokens"),
    ({"name": "a", "prompt_lengths": [10], "output_tokens": 4, "t_max": -1}, "t_max"),
    ({"name": "a", "prompt_lengths": [10], "output_tokens": 4, "t_max": 1, "tmax": 2}, "unknown keys tmax"),
    ({"name": "a", "prompt_length_distribution": {"kind": "zipf"}, "output_tokens": 4, "t_max": 1}, "kind"),
    ({"name": "a", "prompt_lengths": [10, 20], "prompt_length_weights": [1], "output_tokens": 4, "t_max": 1},
     "prompt_length_weights"),
])
def test_parse_applications_rejects_invalid(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_applications({"applications": [entry]})


def test_parse_applications_distributions():
    uniform, normal = parse_applications({"applications": [
        {"name": "u", "prompt_length_distribution": {"kind": "uniform", "min": 100, "max": 300},
         "output_tokens": 1, "t_max": 1},
        {"name": "n", "prompt_length_distribution": {"kind": "normal", "mean": 500, "std": 100, "min": 64},
         "output_tokens": 1, "t_max": 1},
    ]})

    assert uniform.prompt_lengths.min() >= 100
    assert uniform.prompt_lengths.max() <= 300
    assert uniform.prompt_lengths @ uniform.weights == pytest.approx(200, abs=1)
    assert normal.prompt_lengths @ normal.weights == pytest.approx(500, abs=2)
    assert normal.prompt_lengths.min() >= 64


def test_parse_profile_rejects_other_format():
    with pytest.raises(ValueError, match="not a MoE² profile"):
        parse_profile({"format": "something", "version": 1, "experts": []})


def test_loss_table_reads_scoretable_files(tmp_path):
    """Files written by coordinator.scoretable load here, and both loss codes agree."""
    from coordinator import scoretable

    rng = np.random.default_rng(8)
    offsets = np.array([0, 2, 5, 6, 9], dtype=np.int64)
    logprobs = np.log(rng.dirichlet(np.ones(30), size=(9, 4))[..., 0]).astype(np.float32)
    written = scoretable.ScoreTable(logprobs=logprobs, offsets=offsets, experts=["a", "b", "c", "d"],
                                    fingerprints=["fa", "fb", "fc", "fd"], example_ids=["x0", "x1", "x2", "x3"])
    scoretable.save_score_table(written, tmp_path / "scores.npz")
    gates = rng.dirichlet(np.ones(4), size=4)

    losses = LossTable(load_score_table(tmp_path / "scores.npz"), gates)

    for mask in range(1, 16):
        in_subset = np.array([(mask >> n) & 1 for n in range(4)], dtype=float)
        expected = scoretable.example_losses(written, gates * in_subset).mean()
        assert losses.loss(mask) == pytest.approx(expected, rel=1e-10)
