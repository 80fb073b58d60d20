"""Rank 0's console: a progress bar on a terminal, plain lines in logs, silence elsewhere.

On a terminal (``stdout.isatty()``) training shows a tqdm bar with the loss and samples/s of
the last report, and each evaluation a short bar of its own; other lines are written above
the bars. When stdout is a file or a pipe (Slurm logs, CI), a bar would fill it with carriage
returns, so each report is one plain line instead:

    step     500/1500  loss 0.5731  98,112 samples/s  lr 0.05

Other ranks construct ``Progress(enabled=False)`` and print nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, TextIO


def _is_terminal(stream: TextIO) -> bool:
    """A terminal with a width: a pty of 0 columns (some wrappers) would draw nothing."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class Progress:
    def __init__(
        self,
        enabled: bool,
        total_steps: int,
        use_bar: bool | None = None,
        stream: TextIO | None = None,
        print_fn: Callable[[str], None] | None = None,
    ) -> None:
        self.enabled = enabled
        self.print_fn = print_fn
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.use_bar = enabled and (_is_terminal(self.stream) if use_bar is None else use_bar)
        self._bar: Any = None
        self._eval_bar: Any = None

    def _train_bar(self, step: int) -> Any:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=step,
                desc="train",
                unit="step",
                # Loss and samples/s before the bar, so a narrow terminal cuts the bar, not them.
                bar_format="{desc} {n_fmt}/{total_fmt} {postfix} |{bar}| {elapsed}<{remaining}",
                file=self.stream,
                dynamic_ncols=True,
                leave=True,
            )
        return self._bar

    def start_training(self, step: int) -> None:
        if self.use_bar:
            self._train_bar(step)

    def advance(self, num_steps: int = 1) -> None:
        """One training step done (cheap: tqdm redraws at most a few times a second)."""
        if self._bar is not None:
            self._bar.update(num_steps)

    def report(self, step: int, loss: float, samples_per_sec: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.use_bar:
            self._train_bar(step).set_postfix_str(
                f"loss {loss:.4f}  {samples_per_sec:,.0f} samples/s", refresh=False
            )
        else:
            self.write(
                f"step {step:>7}/{self.total_steps}  loss {loss:.4f}  "
                f"{samples_per_sec:,.0f} samples/s  lr {lr:.4g}"
            )

    def start_eval(self, num_batches: int | None) -> None:
        if self.use_bar:
            from tqdm import tqdm

            self._eval_bar = tqdm(
                total=num_batches, desc="eval", unit="batch", file=self.stream,
                dynamic_ncols=True, leave=False, position=1,
            )

    def eval_advance(self) -> None:
        if self._eval_bar is not None:
            self._eval_bar.update(1)

    def end_eval(self) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None

    def write(self, line: str) -> None:
        """A line above the bars (or a plain line); nothing on other ranks."""
        if not self.enabled:
            return
        if self._bar is not None or self._eval_bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        elif self.print_fn is not None:
            self.print_fn(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        self.end_eval()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
