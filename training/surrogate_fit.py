"""Fit KVzap surrogates on KVzip+ targets, one layer at a time, and measure R^2 on held-out prompts.

Data flow: prompts -> (inputs, targets) in shards (``kvzip_targets``) -> **per-layer fit and R^2
(this module)** -> checkpoint (``train_surrogate``).

- linear: ridge regression in closed form (sklearn ``Ridge(alpha)`` semantics: centred data,
  unpenalised intercept), accumulated shard by shard in float64, so memory is ``D x D``.
- mlp: ``Linear(D, hidden) -> GELU -> Linear(hidden, H_kv)`` trained by mini-batch AdamW with a
  cosine schedule over epochs, gradient-norm clipping and a random validation split (kvpress uses
  skorch with exactly these settings). One layer's training rows are held in memory at a time.

kvpress fits all layers in one skorch model (mean MSE over layers, one global gradient clip);
layers share no parameters, so fitting them one by one is the same problem up to that clip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from training.kvzip_targets import TargetStore
from vllm_kvzap.scorers import SurrogateConfig


@dataclass(frozen=True)
class FitConfig:
    hidden_dim: int = 512
    epochs: int = 15
    lr: float = 5e-3
    batch_size: int = 512
    weight_decay: float = 0.01  # torch AdamW default, as skorch uses it
    grad_clip: float = 1.0
    val_fraction: float = 0.05
    alpha: float = 1.0  # ridge
    seed: int = 0
    device: str = "cpu"


def fit_ridge(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], alpha: float = 1.0
) -> nn.Linear:
    """Closed-form ridge regression ``y ~ x W^T + b`` over streamed ``(x [n, D], y [n, H])``."""
    n, sx, sy, xtx, xty = 0, 0.0, 0.0, 0.0, 0.0
    for x, y in batches:
        x, y = x.double(), y.double()
        n += len(x)
        sx, sy = sx + x.sum(0), sy + y.sum(0)
        xtx, xty = xtx + x.T @ x, xty + x.T @ y
    if n == 0:
        raise ValueError("ridge regression needs at least one row")
    mx, my = sx / n, sy / n
    a = xtx - n * torch.outer(mx, mx) + alpha * torch.eye(len(mx), dtype=torch.float64)
    w = torch.linalg.solve(a, xty - n * torch.outer(mx, my))  # [D, H]
    linear = nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        linear.weight.copy_(w.T)
        linear.bias.copy_(my - mx @ w)
    return linear


def fit_mlp(
    x: torch.Tensor, y: torch.Tensor, cfg: FitConfig, bar=None, label: str = ""
) -> nn.Module:
    """Mini-batch AdamW on MSE; ``bar`` (tqdm) advances once per epoch."""
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = nn.Sequential(
            nn.Linear(x.shape[1], cfg.hidden_dim), nn.GELU(), nn.Linear(cfg.hidden_dim, y.shape[1])
        )
    net.to(cfg.device)
    if cfg.device != "cpu":  # one transfer per layer when the rows fit on the device
        try:
            x, y = x.to(cfg.device), y.to(cfg.device)
        except torch.OutOfMemoryError:
            pass
    perm = torch.randperm(len(x), generator=gen)
    n_val = int(len(x) * cfg.val_fraction)
    val, train = perm[:n_val], perm[n_val:]
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)

    def batch(idx):
        return x[idx].to(cfg.device, torch.float32), y[idx].to(cfg.device, torch.float32)

    for epoch in range(cfg.epochs):
        net.train()
        total = 0.0
        for idx in train[torch.randperm(len(train), generator=gen)].split(cfg.batch_size):
            xb, yb = batch(idx)
            loss = nn.functional.mse_loss(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if bar is not None:
            val_loss = mse(net, x[val], y[val]) if n_val else math.nan
            bar.set_postfix_str(
                f"{label} epoch {epoch + 1} train {total / len(train):.4f} val {val_loss:.4f}"
            )
            bar.update(1)
    return net.eval()


@torch.no_grad()
def predict(module: nn.Module, x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Predictions ``[n, H]`` (float32, CPU) of one layer's fitted module."""
    device = next(module.parameters()).device
    outs = [module(xc.to(device, torch.float32)).float().cpu() for xc in x.split(chunk)]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def mse(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return nn.functional.mse_loss(predict(module, x), y.float().cpu()).item()


def r2_per_head(y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination of each output column ``[H]`` (sklearn ``r2_score``)."""
    y, pred = y.double(), pred.double()
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return (1 - ss_res / ss_tot).float()


def fit_surrogate(store: TargetStore, kind: str, cfg: FitConfig) -> dict:
    """Fit every layer; returns ``config`` (SurrogateConfig), ``state_dict`` (published names),
    ``r2`` ``[L, H]`` on the test split, and test ``pred``/``y`` per layer."""
    from tqdm.auto import tqdm

    if kind not in ("linear", "mlp"):
        raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
    n_layers = store.num_layers
    if kind == "linear":
        bar = tqdm(total=n_layers, desc="ridge", unit="layer")
    else:
        bar = tqdm(total=n_layers * cfg.epochs, desc="mlp", unit="epoch")
    state, r2, preds, ys = {}, [], [], []
    for layer in range(n_layers):
        if kind == "linear":
            module = fit_ridge(store.iter_layer("train", layer), cfg.alpha)
            bar.update(1)
        else:
            x, y = store.layer("train", layer)
            module = fit_mlp(x, y, cfg, bar, label=f"layer {layer}")
            del x, y
        state.update(
            {f"layers.{layer}.{k}": v.detach().cpu() for k, v in module.state_dict().items()}
        )
        x_test, y_test = store.layer("test", layer)
        pred = predict(module, x_test)
        r2.append(r2_per_head(y_test, pred))
        preds.append(pred)
        ys.append(y_test.float())
    bar.close()
    config = SurrogateConfig(
        input_dim=store.meta["hidden_size"],
        output_dim=store.meta["num_kv_heads"],
        n_modules=n_layers,
        hidden_dim=cfg.hidden_dim if kind == "mlp" else None,
        dtype="float32",
    )
    return {"config": config, "state_dict": state, "r2": torch.stack(r2), "pred": preds, "y": ys}
