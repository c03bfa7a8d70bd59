"""Pushing a training run to the Hub: one background [`~ilr.hub.HubPusher`] per agent repository.

Checkpoints go to each agent's `step-<step>` branch as they are saved (`hub_strategy` other than `end`), the final
models with their cards to `main`; pushes run in the background and never change the local files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ilr.cards import build_training_card
from ilr.checkpoints import TRAINER_STATE_NAME
from ilr.hub import HubPusher, step_revision


if TYPE_CHECKING:
    from ilr.configs import AgentConfig, ILRConfig


__all__ = ["AgentPushers"]

logger = logging.getLogger(__name__)


class AgentPushers:
    """
    The run's Hub pushers, one per agent repository (`hub_model_id`); none when `enabled` is false (no `push_to_hub`,
    or not the main process), and then every method does nothing.

    Args:
        agents (`Sequence[AgentConfig]`):
            The trained agents.
        args ([`~ilr.configs.ILRConfig`]):
            The run's settings (`hub_token`, `hub_private_repo`, `hub_strategy`, `output_dir`).
        enabled (`bool`):
            Whether this process pushes.
    """

    def __init__(self, agents: Sequence[AgentConfig], args: ILRConfig, enabled: bool):
        self.agents = list(agents)
        self.args = args
        self.pushers: dict[str, HubPusher] = {}
        if enabled:
            # Snapshots are hard links: the staging folder must sit on the checkpoints' filesystem, outside them.
            staging = Path(args.output_dir) / ".hub_staging"
            self.pushers = {
                agent.name: HubPusher(
                    agent.hub_model_id, token=args.hub_token, private=bool(args.hub_private_repo), staging_dir=staging
                )
                for agent in self.agents
            }

    def push_checkpoint(self, checkpoint: Path, step: int) -> None:
        """Queue each agent's checkpoint for its repository's `step-<step>` branch (`hub_strategy` other than `end`)."""
        if not self.pushers or str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy)) == "end":
            return
        for agent in self.agents:
            self.pushers[agent.name].push_folder(
                checkpoint / agent.name,
                revision=step_revision(step),
                commit_message=f"ILR checkpoint, step {step}",
                extra_files={TRAINER_STATE_NAME: checkpoint / TRAINER_STATE_NAME},
            )

    def push_final(
        self,
        folders: list[Path],
        *,
        recipe_path: str | os.PathLike | None,
        dataset_name: str,
        data_files: list[str] | None,
        global_step: int,
        num_training_steps: int,
    ) -> list[Any]:
        """
        Push each agent's final model with its model card to the `main` branch of its `hub_model_id`, then wait for
        every queued push (checkpoints included).

        Args:
            folders (`list[Path]`):
                One saved model folder per agent.
            recipe_path (`str` or `os.PathLike`, *optional*):
                The recipe file, embedded in the cards (credentials removed).
            dataset_name (`str`):
                The training data's name, for the cards.
            data_files (`list[str]`, *optional*):
                Local data files, for the cards.
            global_step (`int`):
                The last step trained.
            num_training_steps (`int`):
                The run's length.

        Returns:
            `list[PushResult]`: The pushes that failed (empty when all succeeded or nothing was pushed).
        """
        if not self.pushers:
            return []
        for agent, folder in zip(self.agents, folders):
            peers = [peer for peer in self.agents if peer is not agent]
            card = build_training_card(
                model_name=agent.hub_model_id.split("/")[-1],
                base_model=agent.model_name_or_path,
                agent_name=agent.name,
                peers={peer.name: peer.model_name_or_path for peer in peers},
                peer_repos={peer.name: peer.hub_model_id for peer in peers if peer.hub_model_id},
                recipe_path=recipe_path,
                dataset_name=dataset_name,
                data_files=data_files,
                global_step=global_step,
                num_training_steps=num_training_steps,
                repo_id=agent.hub_model_id,
            )
            card_path = Path(self.args.output_dir) / f"README-{agent.name}.md"
            card.save(card_path)
            self.pushers[agent.name].push_folder(
                folder,
                commit_message=f"ILR final model, step {global_step}",
                extra_files={"README.md": card_path},
            )
        return self.close()

    def close(self) -> list[Any]:
        """
        Wait for every queued Hub push and stop the pushers; log each failure.

        Returns:
            `list[PushResult]`: The pushes that failed.
        """
        failed = []
        for pusher in self.pushers.values():
            results = pusher.wait()
            pusher.close()
            failed += [result for result in results if not result.ok]
            logger.info("%d of %d pushes to %s succeeded.", sum(r.ok for r in results), len(results), pusher.repo_id)
        for result in failed:
            logger.error("Hub push failed: %s", result)
        self.pushers = {}
        return failed
