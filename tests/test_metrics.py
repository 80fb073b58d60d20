import itertools
import math
from fractions import Fraction

import pytest
import torch

from modules.metrics import auc, click_metrics, log_loss, normalized_entropy
from tests.helpers import run_ranks
from train.loop import eval_scores


def brute_force_auc(scores, labels):
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(
        1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positives, negatives)
    )
    return wins / (len(positives) * len(negatives))


def test_auc_matches_pair_counting_with_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 7, (300,), generator=generator).float()  # many ties
    labels = (torch.rand(300, generator=generator) < 0.3).float()
    assert math.isclose(auc(scores, labels), brute_force_auc(scores.tolist(), labels.tolist()))


def exact_auc(scores, labels) -> float:
    """The AUC as the exact fraction of (positive, negative) pairs won, a tie half a win,
    rounded once to a float: what an exact AUC must return to the last bit."""
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    half_wins = sum(2 if p > n else 1 if p == n else 0 for p in positives for n in negatives)
    return float(Fraction(half_wins, 2 * len(positives) * len(negatives)))


def eval_samples(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's eval logits and labels: few distinct logits (ties across ranks), rank 1's
    rows more often clicked and scored higher than rank 0's (so that one rank's rows alone
    give another AUC), and rank 1's last 37 rows padding (label -1)."""
    generator = torch.Generator().manual_seed(rank)
    logits = torch.randint(-6, 6, (400,), generator=generator).float() / 4 + rank
    labels = (torch.rand(400, generator=generator) < 0.2 + 0.3 * rank).float()
    if rank == 1:
        labels[-37:] = -1.0
    return logits, labels


def _eval_scores_worker(rank: int, world_size: int) -> None:
    scores = eval_scores(*eval_samples(rank))
    # The reference: every rank's rows concatenated and scored in one process.
    logits, labels = (torch.cat(parts) for parts in zip(*map(eval_samples, range(world_size))))
    real = labels >= 0
    expected = click_metrics(logits[real], labels[real])
    assert scores == expected  # every figure, to the last bit, on every rank
    assert scores.num_samples == 2 * 400 - 37
    assert scores.auc == exact_auc(logits[real].tolist(), labels[real].tolist())


def test_eval_scores_over_two_ranks_equal_one_process_scoring_every_row():
    run_ranks(_eval_scores_worker, 2)


def test_auc_is_the_exact_fraction_of_pairs_won():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 9, (500,), generator=generator).float()  # many ties
    labels = (torch.rand(500, generator=generator) < 0.4).float()
    assert auc(scores, labels) == exact_auc(scores.tolist(), labels.tolist())


def test_auc_extremes_and_single_class():
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 1.0])))


def test_normalized_entropy_is_one_for_the_base_rate():
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0] * 25)
    base_logit = math.log(0.25 / 0.75)
    logits = torch.full((100,), base_logit)
    assert math.isclose(normalized_entropy(logits, labels), 1.0, rel_tol=1e-9)
    assert math.isclose(log_loss(logits, labels), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _logit(p):
    return math.log(p / (1.0 - p))


def test_calibration_and_click_rates_by_hand():
    from modules.metrics import calibration, click_metrics

    # Predicted click probabilities 0.2, 0.5, 0.8, 0.1 against clicks 0, 1, 1, 0:
    # predicted clicks 1.6, actual clicks 2, so calibration 0.8; CTR 2/4; predicted CTR 1.6/4.
    logits = torch.tensor([_logit(p) for p in (0.2, 0.5, 0.8, 0.1)])
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    scores = click_metrics(logits, labels)
    assert scores.calibration == pytest.approx(0.8)
    assert scores.ctr == pytest.approx(0.5)
    assert scores.predicted_ctr == pytest.approx(0.4)
    assert scores.num_samples == 4
    # Positive scores 0.5, 0.8 beat both negatives: AUC 1; log loss by hand.
    assert scores.auc == 1.0
    by_hand = -(math.log(0.8) + math.log(0.5) + math.log(0.8) + math.log(0.9)) / 4
    assert scores.log_loss == pytest.approx(by_hand)
    assert scores.normalized_entropy == pytest.approx(by_hand / math.log(2))
    # Over-prediction reads above 1; no clicks at all has no calibration.
    assert calibration(torch.tensor([_logit(0.9), _logit(0.7)]), torch.tensor([1.0, 0.0])) == (
        pytest.approx(1.6)
    )
    assert math.isnan(calibration(logits, torch.zeros(4)))


def test_train_window_metrics_by_hand_over_the_last_steps_of_every_rank():
    """Known logits for four steps on two ranks, the last two of them scored (a window that
    ends at a segment end is shorter than the log_every steps kept): AUC, NE, calibration
    and CTR from pair counting and the log-loss formula by hand. The first two steps (all
    negatives scored 5.0) are outside the window and would lower the AUC."""
    from train.window_quality import PredictionWindow, window_quality

    steps_by_rank = [
        [([5.0, 5.0], [0, 0]), ([5.0, 5.0], [0, 0]), ([2.0, -1.0], [1, 0]), ([0.0, 1.0], [0, 1])],
        [([5.0, 5.0], [0, 0]), ([5.0, 5.0], [0, 0]), ([-2.0, 0.5], [1, 0]), ([3.0, -3.0], [1, 0])],
    ]
    windows = []
    for steps in steps_by_rank:
        window = PredictionWindow(max_steps=3)  # log_every=3: the first step is dropped
        for logits, labels in steps:
            window.add(torch.tensor(logits), torch.tensor(labels, dtype=torch.float32))
        windows.append(window.last(2))
    assert windows[0].tolist() == [[2.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]]
    metrics = window_quality(torch.stack(windows))  # what gather_stack hands rank 0
    # Positives 2, 1, -2, 3; negatives -1, 0, 0.5, -3: 4 + 4 + 1 + 4 of 16 pairs ordered.
    assert metrics["train/auc"] == pytest.approx(13 / 16)
    positives, negatives = [2.0, 1.0, -2.0, 3.0], [-1.0, 0.0, 0.5, -3.0]
    log_loss = (sum(-math.log(_sigmoid(x)) for x in positives)
                + sum(-math.log(1 - _sigmoid(x)) for x in negatives)) / 8
    assert metrics["train/ctr"] == 0.5
    assert metrics["train/ne"] == pytest.approx(log_loss / math.log(2))
    predicted_clicks = sum(_sigmoid(x) for x in positives + negatives)
    assert metrics["train/calibration"] == pytest.approx(predicted_clicks / 4)
    assert window.last(3)[0].tolist() == [5.0, 5.0, -2.0, 0.5, 3.0, -3.0]
    with pytest.raises(ValueError, match="holds 3 steps"):
        window.last(4)


def _figures(world_size: int) -> torch.Tensor:
    """Per-rank figures in RANK_FIGURES order with rank r's step taking (r + 1) / 10 s."""
    from train.step_stats import RANK_FIGURES

    rows = []
    for rank in range(world_size):
        figure = dict.fromkeys(RANK_FIGURES, 0.0)
        figure.update(loss=0.5 + rank, samples_per_sec=100.0 * (rank + 1),
                      step_seconds=(rank + 1) / 10, data_wait_seconds=0.01,
                      compute_seconds=(rank + 1) / 10 - 0.01, rss_bytes=1000.0 * (rank + 1),
                      peak_rss_bytes=2000.0 * (rank + 1))
        rows.append([figure[name] for name in RANK_FIGURES])
    return torch.tensor(rows, dtype=torch.float64)


def test_per_rank_keys_for_small_jobs_and_min_median_max_above_the_threshold():
    from train.step_stats import rank_table, window_metrics

    shared = dict(batch_size=8, num_steps=5, on_cuda=False,
                  planned_embedding_bytes=[10, 20, 60], measured_embedding_bytes=[11, 21, 61])
    small = window_metrics(_figures(3), per_rank_keys=True, **shared)
    assert small["perf/step_seconds/rank2"] == pytest.approx(0.3)
    assert small["mem/embedding_measured_bytes/rank1"] == 21
    assert not any(key.endswith(("/min", "/median", "/max")) for key in small)
    large = window_metrics(_figures(3), per_rank_keys=False, **shared)
    assert not any("/rank" in key for key in large)
    assert [large[f"perf/step_seconds/{stat}"] for stat in ("min", "median", "max")] == (
        pytest.approx([0.1, 0.2, 0.3])
    )
    assert [large[f"mem/embedding_planned_bytes/{stat}"] for stat in ("min", "median", "max")] == [
        10, 20, 60]
    # The global figures do not depend on the choice.
    for key in ("train/loss", "perf/samples_per_sec", "mem/rss_bytes_max"):
        assert large[key] == small[key]
    # Above the threshold the per-rank figures go to one table per report instead.
    columns, rows = rank_table(_figures(3), **{k: shared[k] for k in (
        "on_cuda", "planned_embedding_bytes", "measured_embedding_bytes")})
    assert columns[0] == "rank" and len(rows) == 3
    assert [row[0] for row in rows] == [0, 1, 2]
    assert rows[2][columns.index("perf/step_seconds")] == pytest.approx(0.3)
    assert rows[1][columns.index("mem/embedding_measured_bytes")] == 21
