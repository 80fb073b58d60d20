import itertools
import math

import torch

from modules.metrics import auc, log_loss, normalized_entropy


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
