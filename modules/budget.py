"""A memory budget -> each feature's method and rows: every row earns the same traffic.

Given the bytes left for the features whose hashing is not pinned, and for each of them a
*traffic model* (the expected lookups per sample of each of its IDs), choose per feature how
many IDs get rows of their own and how many rows the others are hashed into, so the total
fits.

The rule. One traffic threshold t (lookups per sample) for all features, the smallest whose
bytes fit (found by bisection: bytes never grow with t). At t, feature f gets:

* IDs known (a frequency file lists them): a row of its own for every listed ID whose traffic
  is >= t (method ``frequency``, the file's top ``K_f(t)``), and the others share one hashed
  row. IDs the file leaves out are rarer than its last one, so only once every listed ID has
  its own row can some of them reach t: they then get ``ceil(M / t)`` hashed rows, M being
  their traffic in all (what the counted IDs leave of the feature's lookups).
* IDs not known (the declared Zipf law of planted data, ranks only; or uniform over the ID
  space): one hashed table (method ``hash``) of ``K_f(t) + max(1, ceil(M_f(t) / t))`` rows, a
  row per ID above t and enough rows that the traffic of the IDs below t adds about t to each.

Never more rows than the ID space (a feature that fits whole gets ``id_space`` rows).

Why. A row is worth the traffic of the ID it serves, and what costs AUC is collided traffic:
lookups that read a row mixed with other IDs. A row given to an ID seen once per million
samples is wasted while head IDs collide, so the rows go to the IDs above one common
threshold, across features: a feature with a steep head or several IDs per sample gets more
rows than one with a larger but flat ID space. Known IDs below t share one row because a
hashed row of many such IDs serves none of them (mixed, they teach it their average); the
rows it would take buy more head IDs. Where heads and tails are hashed together, the extra
rows do serve: they dilute the tail so that each head ID dominates the row it lands in.
(Giving known tails ``ceil(M_f(t) / t)`` rows too, so that every row carries t, lost 0.008
AUC on experiment=tradeoff at 1000x fewer bytes than full tables: docs/hashing.md.)

What it does not do: it chooses between ``frequency`` and ``hash`` only. QR pays for a
remainder table and multi-hashing for k lookups per ID, and their collisions are not
collisions of whole rows, so neither fits "one row, one ID's traffic". It does not weigh
features by how much they matter to the label, which is unknown before training.

Bytes are counted exactly, as the job holds them: a row costs its parameters and optimizer
state (``row_bytes``), an own row also its entry in the ID map (``own_row_bytes``). The bytes
left after the bisection buy whole rows: own rows for the next most frequent known IDs
(across features, in traffic order, until the next one does not fit), then hashed rows for
the tables whose hashed rows carry the most traffic, so ``budget - used`` is below one row.

Pure code: ``train/hashing/budget.py`` builds the traffic models and the per-row bytes from
the job's config and applies the result.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass

import torch

# hashing.budget_bytes may be written with a unit: 86000, 86kB, 2GiB.
BYTE_UNITS = {
    "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_bytes(where: str, value: object) -> int:
    """A positive whole number of bytes from an int (86000) or a string with a unit
    ("86kB", "2 GiB"); ValueError naming ``where`` otherwise."""
    number: float | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        unit = match[2].upper() if match else ""
        if match and (unit or "B") in BYTE_UNITS:
            number = float(match[1]) * BYTE_UNITS[unit or "B"]
    if number is None or not number.is_integer() or number <= 0:
        raise ValueError(
            f"{where}={value!r} is not a positive whole number of bytes (e.g. 86000, 86kB, 2GiB)"
        )
    return int(number)


class Traffic:
    """Expected lookups per sample of one feature's IDs, most frequent first.

    Attributes:
        id_space: the feature's declared number of IDs (its rows never exceed it).
        total: expected lookups of the feature per sample (1 for one ID per sample).
        ids: the IDs themselves, most frequent first, where known (else None).
        source: where the model comes from, for the job's printout.
    """

    id_space: int
    total: float
    ids: torch.Tensor | None = None
    source: str = ""

    def head(self, threshold: float) -> tuple[int, float]:
        """(number of IDs with traffic >= threshold, their traffic in all)."""
        raise NotImplementedError

    def tail(self, threshold: float, head_ids: int, head_traffic: float) -> float:
        """Traffic of every ID below ``threshold`` (the head's complement)."""
        return max(0.0, self.total - head_traffic)


class ListedTraffic(Traffic):
    """Measured: ``traffic[i]`` lookups per sample of ``ids[i]`` (a frequency file's counts
    over the samples counted). IDs the list leaves out are below its last one; their traffic
    is ``total`` minus the listed."""

    def __init__(self, ids: torch.Tensor, traffic: torch.Tensor, total: float, id_space: int,
                 source: str = "frequency file") -> None:
        if ids.numel() != traffic.numel():
            raise ValueError(f"{ids.numel()} IDs but {traffic.numel()} traffic values")
        self.ids = ids
        self.id_space = id_space
        self.total = total
        self.source = source
        # Ascending for searchsorted, and the traffic of the first i IDs.
        self._negated = (-traffic.to(torch.float64)).contiguous()
        self._cumulative = torch.cumsum(traffic.to(torch.float64), 0)
        self.listed = ids.numel()
        # The IDs the list leaves out, together.
        self.unlisted = max(0.0, total - self.listed_traffic(self.listed))

    def listed_traffic(self, count: int) -> float:
        """Traffic of the first ``count`` IDs."""
        return float(self._cumulative[count - 1]) if count > 0 else 0.0

    def head(self, threshold: float) -> tuple[int, float]:
        count = int(torch.searchsorted(self._negated, torch.tensor([-threshold],
                                                                    dtype=torch.float64),
                                       right=True))
        return count, self.listed_traffic(count)


class ZipfTraffic(Traffic):
    """Declared: the planted data's law of popularity ranks (``modules/synthetic.py``
    ZipfLaw, the continuous density x^-s on [1, N + 1), rank r = floor(x) - 1), times the IDs
    per sample. Ranks only: the raw IDs are not known."""

    def __init__(self, id_space: int, exponent: float, ids_per_sample: float = 1.0) -> None:
        self.id_space = id_space
        self.total = float(ids_per_sample)
        self.source = f"zipf {exponent:g}"
        self._log_law = abs(exponent - 1.0) < 1e-9  # as ZipfLaw: s = 1 is the log law
        self._a = 1.0 - exponent
        self._log_top = math.log(id_space + 1.0)

    def _span(self, low: float, high: float) -> float:
        """G(high) - G(low) for G(x) = x^(1-s) (log x at s = 1), without cancellation."""
        if self._log_law:
            return math.log(high / low)
        return low**self._a * math.expm1(self._a * math.log(high / low))

    def probability(self, rank: int) -> float:
        """Lookups per sample of the ID of popularity ``rank`` (0 = the most popular)."""
        top = self.id_space + 1.0
        return self.total * self._span(rank + 1.0, rank + 2.0) / self._span(1.0, top)

    def head(self, threshold: float) -> tuple[int, float]:
        low, high = 0, self.id_space  # the first rank below the threshold is in [low, high]
        while low < high:
            middle = (low + high) // 2
            if self.probability(middle) >= threshold:
                low = middle + 1
            else:
                high = middle
        return low, self.total - self.tail(threshold, low, 0.0)

    def tail(self, threshold: float, head_ids: int, head_traffic: float) -> float:
        # Ranks head_ids..N-1 cover x in [head_ids + 1, N + 1).
        top = self.id_space + 1.0
        return self.total * self._span(head_ids + 1.0, top) / self._span(1.0, top)


class UniformTraffic(Traffic):
    """Nothing known: every ID of the declared space equally likely."""

    def __init__(self, id_space: int, ids_per_sample: float = 1.0) -> None:
        self.id_space = id_space
        self.total = float(ids_per_sample)
        self.source = "uniform"

    def head(self, threshold: float) -> tuple[int, float]:
        if self.total / self.id_space >= threshold:
            return self.id_space, self.total
        return 0, 0.0


@dataclass(frozen=True)
class BudgetedFeature:
    """A feature whose rows the budget chooses.

    Attributes:
        row_bytes: one row: parameters and optimizer state.
        own_row_bytes: one row of its own for a known ID: ``row_bytes`` plus the ID's entry in
            the map that finds it.
    """

    name: str
    traffic: Traffic
    row_bytes: int
    own_row_bytes: int


@dataclass
class BudgetShare:
    """What one feature gets: ``own_rows`` IDs with a row each (the traffic model's first
    IDs), and ``hashed_rows`` rows that the other IDs are hashed into."""

    feature: BudgetedFeature
    own_rows: int
    hashed_rows: int

    @property
    def rows(self) -> int:
        return self.own_rows + self.hashed_rows

    @property
    def method(self) -> str:
        return "frequency" if self.own_rows > 0 else "hash"

    @property
    def frequent_ids(self) -> torch.Tensor | None:
        ids = self.feature.traffic.ids
        return None if ids is None or self.own_rows == 0 else ids[: self.own_rows].clone()

    @property
    def bytes(self) -> int:
        return (self.own_rows * self.feature.own_row_bytes
                + self.hashed_rows * self.feature.row_bytes)

    @property
    def full(self) -> bool:
        return self.rows >= self.feature.traffic.id_space

    @property
    def own_traffic(self) -> float:
        """Lookups per sample that read rows of their own."""
        traffic = self.feature.traffic
        return traffic.listed_traffic(self.own_rows) if isinstance(traffic, ListedTraffic) else 0.0

    @property
    def next_own_traffic(self) -> float:
        """Traffic of the most frequent known ID without a row of its own (0: none left)."""
        traffic = self.feature.traffic
        if not isinstance(traffic, ListedTraffic) or self.own_rows >= traffic.listed:
            return 0.0
        return traffic.listed_traffic(self.own_rows + 1) - traffic.listed_traffic(self.own_rows)

    @property
    def traffic_per_hashed_row(self) -> float:
        return (self.feature.traffic.total - self.own_traffic) / max(1, self.hashed_rows)


@dataclass
class BudgetAllocation:
    """The shares, the common threshold t (lookups per sample per row) and the bytes used."""

    threshold: float
    shares: dict[str, BudgetShare]

    @property
    def bytes(self) -> int:
        return sum(share.bytes for share in self.shares.values())


class BudgetTooSmall(ValueError):
    """Not even one row per feature fits."""

    def __init__(self, budget_bytes: int, minimum_bytes: int) -> None:
        super().__init__(f"{budget_bytes} bytes are below the {minimum_bytes} bytes of one row "
                         f"per budgeted feature")
        self.budget_bytes = budget_bytes
        self.minimum_bytes = minimum_bytes


def share_at(feature: BudgetedFeature, threshold: float) -> BudgetShare:
    """The feature's rows at traffic threshold ``threshold`` (the module docstring's rule)."""
    traffic = feature.traffic
    head_ids, head_traffic = traffic.head(threshold)
    tail_traffic = traffic.tail(threshold, head_ids, head_traffic)
    if isinstance(traffic, ListedTraffic):
        own = head_ids
        # Listed IDs below t share one row; IDs the list leaves out are below its last one,
        # so only once every listed ID has a row may some of them be above t: t per row.
        unknown = traffic.unlisted if own == traffic.listed else 0.0
        hashed = max(1, math.ceil(unknown / threshold))
    else:
        # One hashed table: a row per head ID, and enough rows that the tail adds ~t to each.
        own = 0
        hashed = head_ids + max(1, math.ceil(tail_traffic / threshold))
    if own + hashed >= traffic.id_space:  # the whole ID space fits: never more rows than IDs
        own = min(own, traffic.id_space - 1)  # one row is left for IDs the map does not hold
        hashed = traffic.id_space - own
    return BudgetShare(feature, own, hashed)


def allocate(features: list[BudgetedFeature], budget_bytes: int) -> BudgetAllocation:
    """The shares of ``features`` within ``budget_bytes``: the smallest threshold whose bytes
    fit (bisection: bytes never grow with the threshold), then the bytes left over as whole
    hashed rows, one at a time to the tail whose rows carry the most traffic."""

    def at(threshold: float) -> BudgetAllocation:
        return BudgetAllocation(threshold, {f.name: share_at(f, threshold) for f in features})

    # Above every feature's total traffic each gets one hashed row: the least it can have.
    high = 2.0 * max([1e-30, *(f.traffic.total for f in features)])
    best = at(high)
    if best.bytes > budget_bytes:
        raise BudgetTooSmall(budget_bytes, best.bytes)
    low = 1e-30  # far below any ID's traffic: every table is as large as the rule makes it
    if at(low).bytes <= budget_bytes:
        best = at(low)
    else:
        log_low, log_high = math.log(low), math.log(high)
        while log_high - log_low > 1e-12:
            middle = at(math.exp(0.5 * (log_low + log_high)))
            if middle.bytes <= budget_bytes:
                best, log_high = middle, math.log(middle.threshold)
            else:
                log_low = math.log(middle.threshold)
    _spend_left_over(best, budget_bytes - best.bytes)
    return best


def _spend_left_over(allocation: BudgetAllocation, left: int) -> None:
    """Whole rows for the bytes left: own rows for the next most frequent known IDs, across
    features, until the next one does not fit (so the own rows stay the top of one common
    order); then hashed rows, each to the table whose hashed rows carry the most traffic."""
    shares = allocation.shares
    queue = [(-share.next_own_traffic, name) for name, share in shares.items()
             if share.next_own_traffic > 0]
    heapq.heapify(queue)
    while queue:
        _, name = heapq.heappop(queue)
        share = shares[name]
        if share.full:
            continue
        if share.feature.own_row_bytes > left:
            break
        share.own_rows += 1
        left -= share.feature.own_row_bytes
        if share.next_own_traffic > 0:
            heapq.heappush(queue, (-share.next_own_traffic, name))
    queue = [(-share.traffic_per_hashed_row, name) for name, share in shares.items()]
    heapq.heapify(queue)
    while queue:
        _, name = heapq.heappop(queue)
        share = shares[name]
        if share.full or share.feature.row_bytes > left:
            continue  # it never fits again: what is left only shrinks
        share.hashed_rows += 1
        left -= share.feature.row_bytes
        heapq.heappush(queue, (-share.traffic_per_hashed_row, name))
