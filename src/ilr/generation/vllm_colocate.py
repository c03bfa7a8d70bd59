"""An in-process vLLM engine per agent (TRL's colocate mode), its weights reloaded after every optimizer step."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ilr.generation.base import GenerationBackend, GenerationOutput, SamplingParams
from ilr.generation.vllm_common import (
    _agent_eos_token_ids,
    _empty_cache,
    _import_vllm,
    _vllm_top_k,
    vllm_named_weights,
)


if TYPE_CHECKING:
    import torch

    from ilr.configs import AgentConfig


logger = logging.getLogger(__name__)


class VLLMColocateBackend(GenerationBackend):
    """
    One in-process `vllm.LLM` for the agent, on the training GPU, as TRL's colocate mode builds it.

    The engine is created like TRL's `VLLMGeneration._init_vllm` (colocate): `distributed_executor_backend=
    "external_launcher"` (keeps the model in this process so weights can be loaded into it), `logprobs_mode=
    "processed_logprobs"` (temperature-scaled logprobs) and `max_num_batched_tokens=4096`. Prompts are sent as token
    ids (`TokensPrompt`), so the agent's own chat template and tokenizer stay in charge; text is decoded with the
    agent's tokenizer. Several agents each get their own engine: give each a share of `gpu_memory_utilization`.

    With `params.seed`, each prompt gets its own seed drawn from it (vLLM seeds per request, so one seed for all
    would give identical prompts identical samples).

    Args:
        agent ([`~ilr.configs.AgentConfig`]):
            Model path, revision, dtype and GGUF file of the engine.
        tokenizer (`PreTrainedTokenizerBase`):
            The agent's tokenizer (chat template, decoding).
        model (`PreTrainedModel`, *optional*):
            The training model; needed with `enable_sleep_mode` and `sleep_level=2` to restore the discarded weights.
        gpu_memory_utilization (`float`, *optional*, defaults to `0.9`):
            Fraction of the GPU this engine may use (weights, activations and KV cache).
        max_model_len (`int`, *optional*):
            Context length (prompt + completion); defaults to the model's.
        enable_sleep_mode (`bool`, *optional*, defaults to `False`):
            Let `sleep()` free the engine's GPU memory while the trainer steps; the engine starts asleep and
            `generate` wakes it.
        sleep_level (`int`, *optional*, defaults to `1`):
            `1` offloads the weights to CPU memory and drops the KV cache; `2` drops both (TRL's choice: less host
            memory, but the weights are pushed again from `model` on wake-up).
        seed (`int`, *optional*):
            Engine seed (used by requests without their own). Defaults to the process rank, as in TRL.
        llm_kwargs (`dict`, *optional*):
            Further `vllm.LLM` arguments; they override the ones above.
    """

    _TAGS = ("weights", "kv_cache")
    # vLLM keeps its process groups in module state shared by every engine of the process; the last engine closed
    # releases them, so that engines built later (another run in the same process) start from a clean state.
    _open_engines: ClassVar[int] = 0
    _world_owned: ClassVar[bool] = False
    # Launcher variables the first engine set because they were missing; the last engine removes them again, or a
    # trainer built later in the process (`make demo`: evaluate, then train) would take them for a distributed launch.
    _env_added: ClassVar[list[str]] = []
    _LAUNCHER_ENV: ClassVar[tuple[str, ...]] = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

    def __init__(
        self,
        agent: AgentConfig,
        tokenizer: Any,
        *,
        model: Any = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        seed: int | None = None,
        llm_kwargs: dict[str, Any] | None = None,
    ):
        vllm = _import_vllm()
        if sleep_level not in (1, 2):
            raise ValueError(f"`sleep_level` must be 1 or 2 (got {sleep_level}).")
        if enable_sleep_mode and sleep_level == 2 and model is None:
            raise ValueError(
                "`sleep_level=2` discards the engine's weights when it sleeps; pass the training `model` so they can "
                "be restored, or use `sleep_level=1`."
            )
        super().__init__(agent.name, tokenizer, _agent_eos_token_ids(agent, tokenizer, model))
        self._vllm = vllm
        self.model = model
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self._asleep: set[str] = set()

        path = agent.model_name_or_path
        kwargs: dict[str, Any] = {
            "model": os.path.join(path, agent.gguf_file) if agent.gguf_file else path,
            "revision": agent.model_revision,
            "dtype": agent.dtype or "auto",
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "enable_sleep_mode": enable_sleep_mode,
            "seed": int(os.environ.get("RANK", "0")) if seed is None else seed,
            "distributed_executor_backend": "external_launcher",
            "logprobs_mode": "processed_logprobs",
            "max_num_batched_tokens": 4096,
            "trust_remote_code": bool(getattr(agent, "trust_remote_code", False)),
        }
        if agent.gguf_file:
            kwargs["tokenizer"] = path  # vLLM reads a GGUF's tokenizer from the original repository
        kwargs.update(llm_kwargs or {})
        if kwargs["distributed_executor_backend"] == "external_launcher":
            # The external launcher joins the torch.distributed world of the trainer; alone, it is a world of one.
            from trl.trainer.utils import ensure_master_addr_port

            if not type(self)._open_engines:
                type(self)._env_added = [name for name in self._LAUNCHER_ENV if name not in os.environ]
            for variable, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(variable, default)
            ensure_master_addr_port()
        cls = type(self)
        if not cls._open_engines:
            import torch

            cls._world_owned = not torch.distributed.is_initialized()  # else vLLM joins the trainer's world
        start = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        cls._open_engines += 1
        self.stats.extra["engine_start_s"] = time.perf_counter() - start
        logger.info("Agent `%s`: vLLM engine started in %.1f s.", agent.name, self.stats.extra["engine_start_s"])
        if enable_sleep_mode:
            self.sleep()

    def _sampling_params(self, params: SamplingParams, num_prompts: int) -> Any:
        common = {
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": _vllm_top_k(params.top_k),
            "max_tokens": params.max_new_tokens,
            "logprobs": 0,  # the sampled token's logprob only
            "stop_token_ids": list(self.eos_token_ids),
        }
        if params.seed is None:
            return self._vllm.SamplingParams(**common)
        rng = random.Random(params.seed)
        return [self._vllm.SamplingParams(**common, seed=rng.getrandbits(31)) for _ in range(num_prompts)]

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        self.wake_up()
        requests = [self._vllm.TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        sampling_params = self._sampling_params(params, len(prompt_ids))
        outputs = self.llm.generate(requests, sampling_params=sampling_params, use_tqdm=False)
        completions = []
        for request in outputs:
            group = []
            for sample in request.outputs:
                token_ids = list(sample.token_ids)
                # One dict per token, keyed by token id; it holds the sampled token (and top-k ones if asked).
                logprobs = [step[token].logprob for token, step in zip(token_ids, sample.logprobs)]
                group.append(self._completion(token_ids, logprobs))
            completions.append(group)
        return GenerationOutput(prompt_ids=prompt_ids, completions=completions)

    def _load_weights(self, model: Any) -> None:
        with vllm_named_weights(model) as weights:
            self.load_named_weights(weights)

    def load_named_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """
        Load checkpoint-format tensors into the engine and reset its prefix cache (`update_weights` sends them all).

        Args:
            weights (`Iterable[tuple[str, torch.Tensor]]`):
                `(name, tensor)` pairs under the model's Hugging Face names, as [`vllm_named_weights`] gives them.
                Layers left out keep their current weights.
        """
        # TRL's colocate sync (`VLLMGeneration.sync_weights`) calls the engine model's `load_weights` once per tensor.
        # That writes checkpoint-format tensors into parameters the engine may have processed after loading: vLLM's
        # CPU build repacks its linear layers for its kernels (their `weight_loader` is gone, and the load raises),
        # and quantised or padded layers differ likewise. The model runner's `reload_weights` puts each layer back
        # in checkpoint format, loads the tensors through the model's own `load_weights` (the same name mapping as
        # TRL's), then redoes the processing layer by layer; same names, same tensors, correct on every platform.
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.reload_weights(weights_iterator=iter(weights))
        self.llm.reset_prefix_cache()

    def _wake(self, tags: Sequence[str]) -> None:
        tags = [tag for tag in self._TAGS if tag in tags and tag in self._asleep]
        if not tags:
            return
        _empty_cache()
        if "weights" in tags and self.sleep_level == 2:
            # Level 2 discarded the weights: map them alone, push the training model's, then wake the rest (TRL).
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
            self._load_weights(self.model)
            tags.remove("weights")
        if tags:
            self.llm.wake_up(tags=tags)
            self._asleep.difference_update(tags)

    def update_weights(self, model: Any) -> None:
        """
        Load `model`'s weights (LoRA merged) into the engine, after an optimizer step.

        Args:
            model (`PreTrainedModel` or `peft.PeftModel`):
                The training model, unwrapped.
        """
        self.model = model
        if self.sleep_level == 2 and "weights" in self._asleep:
            return  # discarded weights are pushed from `self.model` on wake-up
        # Weights must be mapped before they are overwritten (TRL, trl#5142).
        self._wake(["weights"])
        self._load_weights(model)

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights offloaded or discarded per `sleep_level`, KV cache dropped)."""
        if not self.enable_sleep_mode or self._asleep == set(self._TAGS):
            return
        self._wake(self._TAGS)  # from a half-awake state (weights only), wake fully so `sleep` sees one state
        self.llm.sleep(level=self.sleep_level)
        self._asleep = set(self._TAGS)

    def wake_up(self) -> None:
        """Restore the engine's weights and KV cache after `sleep`."""
        self._wake(self._TAGS)

    def close(self) -> None:
        """Drop the engine; its memory is freed once nothing else refers to it. The last engine of the process also
        releases vLLM's process groups (and the torch.distributed world, when vLLM created it)."""
        if self.llm is None:
            return
        self.llm = None
        cls = type(self)
        cls._open_engines -= 1
        if not cls._open_engines:
            from vllm.distributed import parallel_state

            parallel_state.destroy_model_parallel()
            if cls._world_owned:
                parallel_state.destroy_distributed_environment()
            for name in cls._env_added:
                os.environ.pop(name, None)
            cls._env_added = []
        _empty_cache()
