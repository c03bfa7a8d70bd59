"""Generation on each agent's own `trl vllm-serve`, through TRL's `VLLMClient`."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, ClassVar

from ilr.generation.base import GenerationBackend, GenerationOutput, SamplingParams
from ilr.generation.vllm_common import _agent_eos_token_ids, _import_vllm, _vllm_top_k, vllm_named_weights
from ilr.recipe_rules import check_vllm_server_ports


if TYPE_CHECKING:
    from ilr.configs import AgentConfig


class VLLMServerBackend(GenerationBackend):
    """
    Generation on the agent's own `trl vllm-serve`, through TRL's `VLLMClient`.

    (In TRL 1.16 `trl vllm-serve` is a deprecated wrapper of `VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --port P
    --weight-transfer-config '{"backend": "nccl"}' --logprobs-mode processed_logprobs --max-logprobs -1`; either works.)

    Prompts are tokenised here with the agent's chat template and sent as token ids. Weights are synced after each
    optimizer step as TRL's GRPOTrainer does (`VLLMGeneration.sync_weights`, server mode): the NCCL weight-sync
    group is opened once (`init_communicator`, on first use, on the model's device), every tensor is streamed with
    `update_named_params` (LoRA merged), then the server's prefix cache is reset.

    Backends alive in one process must use distinct ports ([`check_vllm_server_ports`]). With `params.seed`, vLLM
    seeds every prompt of the request with the same seed.

    Args:
        agent ([`~ilr.configs.AgentConfig`]):
            `vllm_server_host`, `vllm_server_port` and `vllm_group_port` of the agent's server.
        tokenizer (`PreTrainedTokenizerBase`):
            The agent's tokenizer (chat template, decoding).
        model (`PreTrainedModel`, *optional*):
            The training model; its generation config adds EOS ids (else the checkpoint's `generation_config.json`).
        connection_timeout (`float`, *optional*, defaults to `240.0`):
            Seconds to wait for the server to come up.
    """

    _live: ClassVar[dict[str, tuple[AgentConfig, weakref.ref]]] = {}

    def __init__(self, agent: AgentConfig, tokenizer: Any, *, model: Any = None, connection_timeout: float = 240.0):
        live = [owner for owner, backend in type(self)._live.values() if backend() is not None]
        check_vllm_server_ports([*live, agent])
        _import_vllm()  # the client's weight sync runs on vLLM's NCCL engine
        from trl.generation import vllm_client

        super().__init__(agent.name, tokenizer, _agent_eos_token_ids(agent, tokenizer, model))
        self.agent = agent
        try:
            self.client = vllm_client.VLLMClient(
                host=agent.vllm_server_host,
                server_port=agent.vllm_server_port,
                group_port=agent.vllm_group_port,
                connection_timeout=connection_timeout,
            )
        except OSError as error:  # requests' ConnectionError after `connection_timeout`
            raise ConnectionError(
                f"Agent `{agent.name}`: no vLLM server answered at {agent.vllm_server_host}:{agent.vllm_server_port} "
                f"within {connection_timeout:g} s. Start the agent's server first (`trl vllm-serve --model "
                f"{agent.model_name_or_path} --port {agent.vllm_server_port}`), or check `vllm_server_host` and "
                "`vllm_server_port`."
            ) from error
        self._communicator_ready = False
        self._key = f"{agent.name}@{id(self)}"
        type(self)._live[self._key] = (agent, weakref.ref(self))

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> GenerationOutput:
        extra: dict[str, Any] = {"stop_token_ids": list(self.eos_token_ids)}
        if params.seed is not None:
            extra["seed"] = params.seed
        output = self.client.generate(
            prompts=prompt_ids,
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=_vllm_top_k(params.top_k),
            max_tokens=params.max_new_tokens,
            logprobs=0,
            generation_kwargs=extra,
        )
        if output["logprobs"] is None:
            raise RuntimeError(
                f"The vLLM server of agent `{self.name}` returned no logprobs. Start it with `trl vllm-serve` or with "
                "`vllm serve ... --logprobs-mode processed_logprobs --max-logprobs -1`."
            )
        # Prompt-major: the n completions of prompt p are at p*n ... p*n+n-1. Each token's logprob entries are sorted
        # by probability with the sampled token among them: pick it by id.
        logprob_ids = output.get("logprob_token_ids")
        completions = []
        for p in range(len(prompt_ids)):
            group = []
            for j in range(p * params.n, (p + 1) * params.n):
                token_ids = list(output["completion_ids"][j])
                steps = output["logprobs"][j]
                ids = logprob_ids[j] if logprob_ids is not None else [[t] for t in token_ids]
                logprobs = [lps[ids_t.index(t)] for t, lps, ids_t in zip(token_ids, steps, ids)]
                group.append(self._completion(token_ids, logprobs))
            completions.append(group)
        return GenerationOutput(prompt_ids=prompt_ids, completions=completions)

    def update_weights(self, model: Any) -> None:
        """
        Stream `model`'s weights (LoRA merged) to the server and reset its prefix cache.

        Args:
            model (`PreTrainedModel` or `peft.PeftModel`):
                The training model, unwrapped, on the CUDA device that joins the server's NCCL group.
        """
        if not self._communicator_ready:
            self.client.init_communicator(device=next(model.parameters()).device)
            self._communicator_ready = True
        with vllm_named_weights(model) as weights:
            metadata = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in weights]
            self.client.update_named_params(metadata, iter(weights))
        self.client.reset_prefix_cache()

    def close(self) -> None:
        """Close the weight-sync group and free this agent's ports for another backend."""
        type(self)._live.pop(self._key, None)
        if self._communicator_ready:
            self.client.close_communicator()
            self._communicator_ready = False
