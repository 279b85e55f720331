"""Each objective against numbers worked by hand (log sigmoid(x) = -log(1 + e^-x))."""

import functools
import math

import pytest
import torch

from llama2.train.losses import (
    MARGINS,
    combined_reward,
    dpo_loss,
    gae,
    per_token_kl,
    per_token_kl_k3,
    ppo_policy_loss,
    ppo_rewards,
    ppo_value_loss,
    ranking_loss,
    whiten,
)


def softplus(x):  # -log sigmoid(-x)
    return math.log(1 + math.exp(x))


@pytest.mark.parametrize("setting", ["none", "small", "large"])
def test_ranking_loss_with_each_margin(setting):
    rc, rr = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.5])
    ratings = ["significantly_better", "slightly_better"]
    m = torch.tensor([MARGINS[setting][r] for r in ratings])
    expected = {
        "none": (softplus(-1.0) + softplus(0.0)) / 2,  # margins 0, 0
        "small": (softplus(0.0) + softplus(1 / 3)) / 2,  # margins 1, 1/3
        "large": (softplus(2.0) + softplus(1.0)) / 2,  # margins 3, 1
    }[setting]
    assert ranking_loss(rc, rr, m).item() == pytest.approx(expected, rel=1e-6)
    assert MARGINS["large"]["better"] == 2.0 and MARGINS["small"]["better"] == pytest.approx(2 / 3)


def test_dpo_loss_by_hand():
    # (pc - rc) - (pr - rr) = (-1 - -2) - (-3 - -2.5) = 1.5; beta 0.1 -> -log sigmoid(0.15)
    loss = dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.5]),
        beta=0.1,
    )
    assert loss.item() == pytest.approx(softplus(-0.15), rel=1e-6)


def test_per_token_kl_and_combined_reward_and_whitening():
    assert per_token_kl(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])).tolist() == [
        0.5,
        -1.0,
    ]
    # raw scores (logits); the gate reads their probabilities 0.9, 0.5, 0.1, 0.3, 0.2
    r_help = torch.logit(torch.tensor([0.9, 0.9, 0.9, 0.2]))
    r_safe = torch.logit(torch.tensor([0.5, 0.1, 0.5, 0.3]))
    is_safety = torch.tensor([True, False, False, False])
    # safety prompt -> safety; unsafe answer (0.1 < 0.15) -> safety; otherwise helpfulness
    assert torch.sigmoid(combined_reward(r_help, r_safe, is_safety)).tolist() == pytest.approx(
        [0.5, 0.1, 0.9, 0.2]
    )
    w = whiten(torch.tensor([1.0, 2.0, 3.0, 4.0]))  # mean 2.5, population std sqrt(1.25)
    assert w.tolist() == pytest.approx(
        [(x - 2.5) / math.sqrt(1.25) for x in (1, 2, 3, 4)], rel=1e-6
    )


def test_ppo_rewards_put_the_score_on_the_last_token():
    r_c = torch.tensor([0.0, math.log(4)])  # raw scores (sigmoids 0.5, 0.8); whitened -> -1, +1
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    r = ppo_rewards(r_c, kl, mask, beta=0.01)
    expected = torch.tensor([[-0.001, -0.002 - 1.0, 0.0], [-0.004, -0.005, -0.006 + 1.0]])
    torch.testing.assert_close(r, expected)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    mask = torch.ones(1, 3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2: delta = 1 - 0.3 = 0.7; A2 = 0.7
    # t=1: delta = 0 + 0.3 - 0.4 = -0.1; A1 = -0.1 + 0.5 * 0.7 = 0.25
    # t=0: delta = 0 + 0.4 - 0.5 = -0.1; A0 = -0.1 + 0.5 * 0.25 = 0.025
    torch.testing.assert_close(adv, torch.tensor([[0.025, 0.25, 0.7]]))
    torch.testing.assert_close(ret, torch.tensor([[0.525, 0.65, 1.0]]))


def test_ppo_clipped_objective_and_value_loss_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1 (old logp 0)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, frac = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # min(1.5*1, 1.2*1) = 1.2; min(0.5*1, 0.8*1) = 0.5; min(1.1*-2, 1.1*-2) = -2.2
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 2.2) / 3, rel=1e-6)
    assert frac.item() == pytest.approx(1 / 3)  # only the first token was clipped
    v = torch.tensor([[1.0, 0.0]])
    v_old = torch.tensor([[0.5, 0.1]])
    ret = torch.tensor([[2.0, 0.0]])
    # token 0: (1-2)^2 = 1 vs clipped 0.5+0.2 = 0.7: (0.7-2)^2 = 1.69 -> 1.69
    # token 1: (0-0)^2 = 0 vs clipped 0.1-0.1 = 0.0: 0 -> 0
    assert ppo_value_loss(v, v_old, ret, torch.ones(1, 2), clip=0.2).item() == pytest.approx(
        0.5 * 1.69 / 2
    )


def test_ppo_rewards_keep_the_score_when_the_batch_cannot_be_whitened():
    # one prompt, or R_c all equal: whitening would make every score exactly 0, leaving only
    # the KL term; below two distinct scores the raw logit is passed on instead
    logit = math.log(0.99 / 0.01)
    r = ppo_rewards(torch.tensor([logit]), torch.zeros(1, 3), torch.ones(1, 3), 0.01)
    assert r[0, -1].item() == pytest.approx(logit) and r[0, :2].tolist() == [0.0, 0.0]
    same = ppo_rewards(torch.full((3,), 2.0), torch.zeros(3, 2), torch.ones(3, 2), 0.01)
    assert same[:, -1].tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_ppo_rewards_take_raw_scores_beyond_sigmoid_saturation():
    # scores of 15, 17 and 25 are distinct logits (their sigmoids all round to 1.0 in float32)
    r_c = torch.tensor([15.0, 17.0, 25.0])
    mean = (15 + 17 + 25) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in (15, 17, 25)) / 3)
    r = ppo_rewards(r_c, torch.zeros(3, 2), torch.ones(3, 2), 0.01)
    assert r[:, -1].tolist() == pytest.approx([(x - mean) / std for x in (15, 17, 25)], rel=1e-5)


def test_combined_reward_gates_on_the_probability_and_passes_the_raw_score():
    r_help = torch.tensor([20.0, 20.0])
    # sigmoid(-1.8) = 0.142 < 0.15: the safety score; sigmoid(-1.7) = 0.154: helpfulness
    r_safe = torch.tensor([-1.8, -1.7])
    out = combined_reward(r_help, r_safe, torch.tensor([False, False]))
    assert out.tolist() == pytest.approx([-1.8, 20.0])


def test_k3_kl_is_never_negative_where_the_log_ratio_is():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    # r = ref - logp = -0.5, 1.0, 0.0: exp(r) - r - 1 by hand
    want = [math.exp(-0.5) + 0.5 - 1, math.e - 1 - 1, 0.0]
    assert per_token_kl_k3(logp, ref).tolist() == pytest.approx(want, rel=1e-6)
    assert per_token_kl(logp, ref).sum() < 0 < per_token_kl_k3(logp, ref).sum()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    assert per_token_kl_k3(a, b).min() >= 0


@pytest.mark.parametrize("autocast", [False, True])
def test_the_chunked_output_loss_matches_cross_entropy_on_the_logits(autocast, monkeypatch):
    """The next-token loss computed with the output head in chunks (on a CPU) gives the loss
    and every parameter's gradient of F.cross_entropy on the model's logits: across chunk
    boundaries (7 rows a chunk, 3 x 9 tokens), with ignored targets, and under bf16 autocast
    (rounded as the autocast path rounds, up to bf16's precision)."""
    import torch.nn.functional as F

    from llama2 import Transformer, get_preset
    from llama2.train import losses

    monkeypatch.setattr(losses, "CE_CHUNK_ROWS", 7)
    chunked, apply = [], losses.OutputCrossEntropy.apply
    monkeypatch.setattr(
        losses.OutputCrossEntropy, "apply", lambda *a: chunked.append(1) or apply(*a)
    )
    torch.manual_seed(0)
    model = Transformer(get_preset("micro"))
    inputs = torch.randint(0, model.config.vocab_size, (3, 9))
    targets = torch.randint(0, model.config.vocab_size, (3, 9))
    targets[0, :4] = targets[2, 8] = -100

    def grads(loss_fn):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def plain(x, y):
        logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)

    tol = 2e-2 if autocast else 1e-5
    # twice: the second call, on fewer rows, runs in the scratch buffers the first one left
    for x, y in [(inputs, targets), (inputs[1:, :5], targets[1:, :5])]:
        want, want_grads = grads(functools.partial(plain, x, y))
        got, got_grads = grads(functools.partial(losses.next_token_cross_entropy, model, x, y))
        assert chunked  # (the chunked path ran)
        assert abs(got - want) < tol * want
        for name, g in want_grads.items():
            assert (got_grads[name] - g).norm() <= tol * g.norm() + 1e-8, name
    loss = losses.next_token_cross_entropy(model, inputs, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):  # (gradients scaled in place)
        loss.backward()
    with torch.no_grad():  # an evaluation: the loss alone
        loss = losses.next_token_cross_entropy(model, inputs, targets)
        assert abs(loss - plain(inputs, targets)) < 1e-5
