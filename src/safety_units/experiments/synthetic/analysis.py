"""Jain et al.'s three analyses, as functions of activations and weights (any model, synthetic or not):

* separation(safe, unsafe): per layer, how well safe and unsafe activations separate -- a linear probe's held-out
  accuracy and the distance between the cluster means over the mean within-cluster spread;
* update_subspace_shares(W0, W1): the share of the update dW = W1 - W0 that lies in W0's row space vs its null
  space (the paper: safety fine-tuning's update maps unsafe inputs into the null space of the pretrained weights);
* placement(safe, unsafe, others): where other inputs (jailbreaks) land between the two clusters: their position
  along the safe -> unsafe axis (0: the safe mean, 1: the unsafe mean) and the share nearer the safe mean.
Activations: block outputs at the last prompt token, [layers, inputs, hidden] (safety_units.steering.scans.block_states).
"""

from __future__ import annotations

import torch


def activations(model, tokenizer, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Block outputs at each prompt's last token (the assistant header): [layers, prompts, hidden]."""
    from safety_units.steering.prompt_states import block_states, chat_ids  # here: the weight analyses need no model helpers

    return block_states(model, chat_ids(tokenizer, prompts), (-1,), tokenizer.pad_token_id, batch_size)[:, :, 0]


def probe_accuracy(a: torch.Tensor, b: torch.Tensor, steps: int = 200, seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe (a vs b), trained on a seeded half of each set."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([a, b]).double()
    y = torch.cat([torch.zeros(len(a)), torch.ones(len(b))]).double()
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    half = len(x) // 2
    mu, sd = x[:half].mean(0), x[:half].std(0).clamp_min(1e-8)
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.double, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:half] @ w + bias, y[:half]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[half:] @ w + bias > 0).double() == y[half:]).double().mean())


def separation(safe: torch.Tensor, unsafe: torch.Tensor) -> list[dict]:
    """Per layer: probe accuracy, and ||mean_safe - mean_unsafe|| / mean within-cluster RMS distance to the mean."""
    out = []
    for s, u in zip(safe.double(), unsafe.double()):
        spread = 0.5 * ((s - s.mean(0)).norm(dim=1).pow(2).mean().sqrt() + (u - u.mean(0)).norm(dim=1).pow(2).mean().sqrt())
        out.append({"probe_accuracy": probe_accuracy(s, u),
                    "cluster_distance": float((s.mean(0) - u.mean(0)).norm() / spread.clamp_min(1e-12))})
    return out


def update_subspace_shares(w0: torch.Tensor, w1: torch.Tensor, energy: float = 0.99, top: float = 0.01) -> dict:
    """Shares of ||dW||_F^2 in the row space of w0 (its right singular vectors holding `energy` of the squared
    spectrum) and in the complement (the effective null space); `rank`: how many singular vectors that is;
    `top_share`: the share held by the `top` fraction of entries with the largest |dW| (sparsity: 1.0 when the
    update touches only those entries, about 0.06 for a dense Gaussian update at top = 1%)."""
    w0, dw = w0.double(), (w1.double() - w0.double())
    total = float(dw.pow(2).sum())
    _, s, vh = torch.linalg.svd(w0, full_matrices=False)
    cum = s.pow(2).cumsum(0) / s.pow(2).sum().clamp_min(1e-300)
    r = int((cum < energy).sum()) + 1
    row = float((dw @ vh[:r].T).pow(2).sum())
    share_row = row / total if total > 0 else float("nan")
    k = max(1, int(round(top * dw.numel())))
    top_share = float(dw.pow(2).flatten().topk(k).values.sum()) / total if total > 0 else float("nan")
    # an isotropic random update puts r / in_features of its energy in the row space: the chance level, which for a
    # wide weight (down_proj: 512 inputs, rank <= 128) leaves most of any update in the null space
    return {"rank": r, "of": int(min(w0.shape)), "row_space": share_row, "null_space": 1 - share_row,
            "chance_null_space": 1 - r / w0.shape[1],
            "relative_norm": (total ** 0.5) / float(w0.norm()), "top_share": top_share}


def placement(safe: torch.Tensor, unsafe: torch.Tensor, others: torch.Tensor) -> list[dict]:
    """Per layer, for `others`: mean position along the safe -> unsafe axis (projection, 0 = safe mean, 1 = unsafe
    mean) and the share of them nearer the safe mean than the unsafe one."""
    out = []
    for s, u, o in zip(safe.double(), unsafe.double(), others.double()):
        ms, mu = s.mean(0), u.mean(0)
        axis = mu - ms
        t = ((o - ms) @ axis) / axis.pow(2).sum().clamp_min(1e-300)
        nearer_safe = ((o - ms).norm(dim=1) < (o - mu).norm(dim=1)).double().mean()
        out.append({"position": float(t.mean()), "nearer_safe": float(nearer_safe)})
    return out
