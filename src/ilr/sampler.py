"""Seeds of a training step and the question sampler.

Everything random in step `s` is seeded from `(seed, s, stream, ...)`, never from the drift of a global RNG, so a run
resumed from a checkpoint continues exactly as the uninterrupted one. Each purpose draws from its own [`RngStream`].
"""

from __future__ import annotations

import enum

import numpy as np


__all__ = ["QuestionSampler", "RngStream", "seed_sequence", "torch_seed"]


class RngStream(enum.IntEnum):
    """
    The purposes a step draws random numbers for; the value is part of the seed, so it must never change (a resumed
    run would draw other numbers).
    """

    MODES = 0  # `ratio:p` cooperate/compete draws
    INTERACTION = 1  # Idea3: share selection and generation seeds
    SAMPLE_ORDER = 2  # the shuffle of an agent's groups before they are cut into micro-batches
    STEP_TORCH = 3  # torch's global seed for the step (dropout, sampling in the transformers backend)
    PREPASS = 4  # the `pass_rate` difficulty pre-pass (seeded with step 0)


def seed_sequence(*entropy: int) -> np.random.Generator:
    """A generator seeded from a tuple of ints: independent streams for (seed, step, [`RngStream`], ...)."""
    return np.random.default_rng(np.random.SeedSequence([int(value) for value in entropy]))


def torch_seed(*entropy: int) -> int:
    """A non-negative 63-bit seed for `torch.manual_seed` from a tuple of ints, as [`seed_sequence`]."""
    return int(np.random.SeedSequence([int(value) for value in entropy]).generate_state(1, dtype=np.uint64)[0] >> 1)


class QuestionSampler:
    """
    Seeded, epoch-aware order over the training questions, with a resumable position.

    Epoch e visits every row once, in the order of a permutation seeded by `(seed, e)`; a draw that runs past the end
    of an epoch continues at the start of the next one. The state is two integers, so a checkpoint restores the exact
    position (and the permutation is recomputed, not stored).

    Args:
        num_rows (`int`):
            Number of training questions.
        seed (`int`):
            Seed of the permutations.
    """

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError("The training dataset is empty: there are no questions to draw.")
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = seed_sequence(self.seed, self.epoch).permutation(self.num_rows)
            self._order_epoch = self.epoch
        return self._order

    def draw(self, count: int) -> list[int]:
        """
        The next `count` row indices.

        Args:
            count (`int`):
                How many questions to draw.

        Returns:
            `list[int]`: Row indices, in sampling order.
        """
        indices: list[int] = []
        while len(indices) < count:
            order = self._epoch_order()
            taken = order[self.position : self.position + count - len(indices)]
            indices.extend(int(index) for index in taken)
            self.position += len(taken)
            if self.position >= self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    @property
    def epochs_done(self) -> float:
        """Fractional number of epochs drawn so far."""
        return self.epoch + self.position / self.num_rows

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(
                f"The checkpoint's sampler was built for {state['num_rows']} questions with seed {state['seed']}, "
                f"this run has {self.num_rows} with seed {self.seed}: resume with the same data and seed."
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
