"""Multi-agent protocols over generation backends: Idea3 (share -> analyse -> fuse), debate and single-agent answers.

Every protocol returns a [`Transcript`]: for each stage, agent and question one [`Group`] holding the prompt the agent
saw, its prompt ids and the completions it sampled (ids, logprobs, texts). The trainer takes each agent's groups of its
trained stages from it; evaluation reads the final answers; `ilr interact` renders it.

Idea3 for questions q and agents 1..m, G = `num_generations` (docs/ILR_METHOD.md, section 3):

    share    agent i answers the plain single-agent prompt G times; one answer, s_i, is shown to the peers
    analyse  agent i sees q, s_i and the peers' s_j; writes `analysis_samples` analyses framed by its mode
             (cooperate: verify and complement; compete: find flaws, defend or correct its own); the first is shown
    fuse     agent i sees q, all ideas and all shown analyses; samples G final answers

Each stage is one `generate` call per agent covering every question and sample. Agents never see model names: in a
prompt the agents are "Agent 1" .. "Agent m" (the same numbering in every prompt, so an analysis that mentions
"Agent 2" means the same agent to every reader), and each agent is told which number is its own.

Text moves between agents as text; each agent tokenises its own prompt with its own chat template. Before a text is
placed in a prompt, the special tokens of both the writer's and the reader's tokenizer are removed (so one model's
text cannot open or close a turn in another model's chat template) and it is cut to `peer_max_tokens` tokens of the
reader's tokenizer, with a visible marker where text was removed.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ilr.data import build_prompt
from ilr.generation import GenerationBackend, GenerationOutput, Messages, SamplingParams
from ilr.prompts import render


__all__ = [
    "IDEA3_STAGES",
    "TRUNCATION_MARKER",
    "Group",
    "Idea3Settings",
    "StageUsage",
    "Transcript",
    "final_answers",
    "run_debate",
    "run_idea3",
    "run_single",
    "strip_special_tokens",
    "truncate_to_tokens",
]

IDEA3_STAGES = ("share", "analyse", "fuse")
SINGLE_STAGE = "answer"
TRUNCATION_MARKER = "[... truncated ...]"
_TASKS = ("math", "code")
_SHARE_SELECTIONS = ("random", "first")


# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Idea3Settings:
    """
    Sampling and prompt settings of a multi-agent protocol.

    Args:
        num_generations (`int`, *optional*, defaults to `4`):
            Samples per agent and question in the share and fuse stages (the GRPO group size G), and in every round
            of a debate or single-agent run.
        analysis_samples (`int`, *optional*, defaults to `1`):
            Analyses per agent and question; the first one is shown to the peers.
        fuse_samples (`int`, *optional*):
            Final answers per agent and question in the fuse stage; defaults to `num_generations`. Nothing reads the
            fuse answers but the loss and the metrics, so a trainer that does not train the stage samples one.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of every stage (`0.0`: greedy).
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold.
        top_k (`int`, *optional*, defaults to `0`):
            Top-k filter; `0` disables it.
        max_completion_length (`int`, *optional*, defaults to `256`):
            Max new tokens of a share or fuse answer (and of a debate or single-agent answer).
        max_analysis_length (`int`, *optional*):
            Max new tokens of an analysis; defaults to `max_completion_length`.
        peer_max_tokens (`int`, *optional*, defaults to `1024`):
            Budget, in the reading agent's tokens, for each piece of earlier text (a peer's or its own) placed in a
            prompt. Longer text keeps its beginning and its end (where the answer is) around [`TRUNCATION_MARKER`].
        share_selection (`str`, *optional*, defaults to `"random"`):
            Which of an agent's G answers its peers see: `random` (drawn with the protocol's rng) or `first`.
        seed (`int`, *optional*):
            Seeds the protocol's rng (share selection and per-call generation seeds) when no rng is passed.
        system_prompt (`str`, *optional*):
            System message put first in every prompt of every stage (the same one evaluation uses).
    """

    num_generations: int = 4
    analysis_samples: int = 1
    fuse_samples: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 256
    max_analysis_length: int | None = None
    peer_max_tokens: int = 1024
    share_selection: str = "random"
    seed: int | None = None
    system_prompt: str | None = None

    def __post_init__(self):
        if self.max_analysis_length is None:
            self.max_analysis_length = self.max_completion_length
        if self.fuse_samples is None:
            self.fuse_samples = self.num_generations
        if self.share_selection not in _SHARE_SELECTIONS:
            raise ValueError(
                f"`share_selection` must be one of {list(_SHARE_SELECTIONS)} (got {self.share_selection!r})."
            )
        for key in (
            "num_generations",
            "analysis_samples",
            "fuse_samples",
            "max_completion_length",
            "max_analysis_length",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"`{key}` must be >= 1 (got {getattr(self, key)}).")
        # The truncation keeps a head and a tail of the text; below 2 tokens there is nothing useful to keep.
        if self.peer_max_tokens < 2:
            raise ValueError(f"`peer_max_tokens` must be >= 2 (got {self.peer_max_tokens}).")

    @classmethod
    def from_config(cls, config: Any, *, system_prompt: str | None = None) -> Idea3Settings:
        """
        Build the settings from a training config.

        Args:
            config ([`~ilr.configs.ILRConfig`]):
                The recipe's training config; its GRPO sampling fields and Idea3 fields are used.
            system_prompt (`str`, *optional*):
                System message for every prompt.

        Returns:
            [`Idea3Settings`]: the settings.
        """
        return cls(
            num_generations=config.num_generations,
            analysis_samples=config.analysis_samples,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k or 0,
            max_completion_length=config.max_completion_length,
            max_analysis_length=config.max_analysis_length,
            peer_max_tokens=config.peer_max_tokens,
            share_selection=config.share_selection,
            seed=config.seed,
            system_prompt=system_prompt,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Transcript
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """
    What one agent saw and sampled for one question in one stage. All samples share the single context `prompt_ids`,
    so the group is a valid GRPO group; `completion_ids` hold only the tokens the agent generated itself.

    Args:
        agent (`int`):
            Index of the agent in the transcript's `agent_names`.
        stage (`str`):
            Stage name (`share`, `analyse`, `fuse`; `round_<r>` for a debate; `answer` for a single-agent run).
        question (`int`):
            Index of the question in the transcript's `questions`.
        mode (`str`, *optional*):
            `cooperate` or `compete` when the prompt was framed by a mode (Idea3 analyse and fuse), else `None`.
        prompt (`list[dict[str, str]]`):
            The chat messages sent to the backend.
        prompt_ids (`list[int]`):
            The prompt's token ids after the agent's chat template, as returned by the backend.
        completion_ids (`list[list[int]]`):
            Token ids of each sample.
        logprobs (`list[list[float]]`):
            Sampling logprob of each token of each sample.
        texts (`list[str]`):
            Decoded text of each sample.
        finish_reasons (`list[str]`):
            `stop` or `length` for each sample.
        selected (`int`, *optional*):
            Index of the sample shown to the peers in a later stage, `None` if none was shown.
    """

    agent: int
    stage: str
    question: int
    mode: str | None
    prompt: Messages
    prompt_ids: list[int]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    finish_reasons: list[str]
    selected: int | None = None

    @property
    def num_samples(self) -> int:
        return len(self.texts)


@dataclass
class StageUsage:
    """
    Compute spent by one agent on one stage (for the per-run token and time accounting).

    Args:
        calls (`int`, *optional*, defaults to `0`):
            Backend `generate` calls.
        prompts (`int`, *optional*, defaults to `0`):
            Prompts sent.
        completions (`int`, *optional*, defaults to `0`):
            Completions sampled.
        prompt_tokens (`int`, *optional*, defaults to `0`):
            Prompt tokens processed, as counted by the backend.
        generated_tokens (`int`, *optional*, defaults to `0`):
            Tokens generated, as counted by the backend.
        seconds (`float`, *optional*, defaults to `0.0`):
            Wall-clock time of the calls.
    """

    calls: int = 0
    prompts: int = 0
    completions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


@dataclass
class Transcript:
    """
    Everything a multi-agent protocol produced, as plain data.

    Args:
        protocol (`str`):
            `idea3`, `debate` or `single`.
        questions (`list[dict]`):
            The questions, in the canonical schema of `ilr.data`.
        agent_names (`list[str]`):
            The agents' names (for logs and rendering only; prompts never name models).
        stages (`list[str]`):
            Stage names in the order they ran; the last one holds the final answers.
        groups (`dict[str, list[list[Group]]]`):
            For each stage, `groups[stage][agent][question]`.
        usage (`dict[str, list[StageUsage]]`):
            For each stage, `usage[stage][agent]`.
        cooperate (`np.ndarray`, *optional*):
            Boolean mask of shape `[num_questions, num_agents]`, `True` where the agent cooperated on the question
            (Idea3 only).
        settings (`dict`, *optional*):
            The [`Idea3Settings`] the protocol ran with, as a dict.
    """

    protocol: str
    questions: list[dict[str, Any]]
    agent_names: list[str]
    stages: list[str] = field(default_factory=list)
    groups: dict[str, list[list[Group]]] = field(default_factory=dict)
    usage: dict[str, list[StageUsage]] = field(default_factory=dict)
    cooperate: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_questions(self) -> int:
        return len(self.questions)

    @property
    def num_agents(self) -> int:
        return len(self.agent_names)

    @property
    def final_stage(self) -> str:
        return self.stages[-1]

    def group(self, agent: int, stage: str, question: int) -> Group:
        """The group of `agent` for `question` in `stage`."""
        return self.groups[self._check_stage(stage)][agent][question]

    def groups_for(self, agent_index: int, stages: Sequence[str] | None = None) -> list[Group]:
        """
        All groups of one agent in the given stages, e.g. its trained stages.

        Args:
            agent_index (`int`):
                Index of the agent in `agent_names`.
            stages (`Sequence[str]`, *optional*):
                Stages to collect, in this order; defaults to every stage of the transcript.

        Returns:
            `list[Group]`: stage by stage, question by question.
        """
        if not 0 <= agent_index < self.num_agents:
            raise IndexError(f"Agent index {agent_index} is out of range for {self.num_agents} agents.")
        stages = self.stages if stages is None else stages
        return [group for stage in stages for group in self.groups[self._check_stage(stage)][agent_index]]

    def num_generated_tokens(self, agent: int | None = None) -> int:
        """Tokens generated over all stages, by one agent or (`agent=None`) by all."""
        return sum(
            usage.generated_tokens
            for per_agent in self.usage.values()
            for index, usage in enumerate(per_agent)
            if agent is None or index == agent
        )

    def _check_stage(self, stage: str) -> str:
        if stage not in self.groups:
            raise ValueError(
                f"Stage {stage!r} is not in this {self.protocol} transcript; its stages are {self.stages}."
            )
        return stage

    # --- serialisation --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """
        The transcript as JSON-serialisable nested dicts and lists (see [`Transcript.from_dict`]).
        """
        return {
            "protocol": self.protocol,
            "questions": _jsonable(self.questions),
            "agent_names": list(self.agent_names),
            "stages": list(self.stages),
            "cooperate": None if self.cooperate is None else np.asarray(self.cooperate, dtype=bool).tolist(),
            "settings": _jsonable(self.settings),
            "groups": {
                stage: [[_jsonable(dataclasses.asdict(group)) for group in row] for row in rows]
                for stage, rows in self.groups.items()
            },
            "usage": {stage: [dataclasses.asdict(usage) for usage in row] for stage, row in self.usage.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transcript:
        """Rebuild a transcript from [`Transcript.to_dict`]'s output (e.g. after a JSON round trip)."""
        return cls(
            protocol=data["protocol"],
            questions=data["questions"],
            agent_names=data["agent_names"],
            stages=data["stages"],
            groups={
                stage: [[Group(**group) for group in row] for row in rows] for stage, rows in data["groups"].items()
            },
            usage={stage: [StageUsage(**usage) for usage in row] for stage, row in data["usage"].items()},
            cooperate=None if data["cooperate"] is None else np.asarray(data["cooperate"], dtype=bool),
            settings=data["settings"],
        )

    # --- rendering ------------------------------------------------------------------------------------------------
    def render_markdown(self, *, all_samples: bool = False, show_prompts: bool = False) -> str:
        """
        A readable account: per question, per stage, what each agent said (the sample its peers saw), with modes.

        Args:
            all_samples (`bool`, *optional*, defaults to `False`):
                Show every sample of a group, not only the one shown to the peers (or the first).
            show_prompts (`bool`, *optional*, defaults to `False`):
                Also show each agent's prompt messages.

        Returns:
            `str`: Markdown.
        """
        return self._render(markdown=True, all_samples=all_samples, show_prompts=show_prompts)

    def render_text(self, *, all_samples: bool = False, show_prompts: bool = False) -> str:
        """Plain-text version of [`Transcript.render_markdown`], for a terminal."""
        return self._render(markdown=False, all_samples=all_samples, show_prompts=show_prompts)

    def _render(self, *, markdown: bool, all_samples: bool, show_prompts: bool) -> str:
        def heading(level: int, text: str) -> str:
            if markdown:
                return f"{'#' * level} {text}"
            return f"{text}\n{'=-~'[min(level, 3) - 1] * len(text)}"

        def body(text: str) -> str:
            prefix = "> " if markdown else "    "
            return "\n".join(prefix + line if line else prefix.rstrip() for line in (text or "(empty)").splitlines())

        def agent_label(index: int) -> str:
            return f"Agent {index + 1} ({self.agent_names[index]})"

        lines = [heading(1, f"{self.protocol} transcript: {self.num_questions} question(s), {self.num_agents} agents")]
        lines.append("Agents: " + ", ".join(agent_label(i) for i in range(self.num_agents)))
        lines.append("Stages: " + " -> ".join(self.stages))
        for q, question in enumerate(self.questions):
            lines += ["", heading(2, f"Question {q + 1}" + (f" ({question['id']})" if question.get("id") else ""))]
            lines += [body(str(question.get("problem", ""))), ""]
            if self.cooperate is not None:
                modes = ", ".join(
                    f"{agent_label(i)}: {'cooperate' if self.cooperate[q, i] else 'compete'}"
                    for i in range(self.num_agents)
                )
                lines += [f"Modes: {modes}", ""]
            for stage in self.stages:
                lines += [heading(3, f"Stage: {stage}"), ""]
                for agent in range(self.num_agents):
                    group = self.groups[stage][agent][q]
                    shown = group.selected if group.selected is not None else 0
                    samples = range(group.num_samples) if all_samples else [shown]
                    mode = f", {group.mode}" if group.mode else ""
                    if show_prompts:
                        lines.append(f"{agent_label(agent)}{mode}, prompt:")
                        for message in group.prompt:
                            lines += [f"[{message['role']}]", body(message["content"])]
                        lines.append("")
                    for sample in samples:
                        notes = [f"sample {sample + 1}/{group.num_samples}", group.finish_reasons[sample]]
                        if sample == group.selected:
                            notes.append("shown to peers")
                        title = f"{agent_label(agent)}{mode} ({', '.join(notes)}):"
                        lines += [f"**{title}**" if markdown else title, body(group.texts[sample]), ""]
        lines.append(heading(2, "Usage"))
        for stage in self.stages:
            for agent, usage in enumerate(self.usage.get(stage, [])):
                lines.append(
                    f"- {stage} / {agent_label(agent)}: {usage.calls} call(s), {usage.completions} completions, "
                    f"{usage.prompt_tokens} prompt + {usage.generated_tokens} generated tokens, {usage.seconds:.2f} s"
                )
        return "\n".join(lines) + "\n"


def final_answers(transcript: Transcript) -> list[list[str]]:
    """
    Each agent's own final answer to each question: the first sample of the transcript's last stage.

    Args:
        transcript ([`Transcript`]):
            The output of [`run_idea3`], [`run_debate`] or [`run_single`].

    Returns:
        `list[list[str]]`: `answers[question][agent]`.
    """
    last = transcript.groups[transcript.final_stage]
    return [
        [last[agent][q].texts[0] for agent in range(transcript.num_agents)] for q in range(transcript.num_questions)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Text passed between agents
# ---------------------------------------------------------------------------------------------------------------------
def _special_tokens(tokenizer: Any) -> set[str]:
    # `all_special_tokens` misses chat-structure tokens such as ChatML's `<|im_start|>`, which are registered only as
    # special added tokens.
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(token.content for token in added.values() if getattr(token, "special", False))
    return {token for token in tokens if token}


def strip_special_tokens(text: str, *tokenizers: Any) -> str:
    """
    Remove every special token string of the given tokenizers from a text.

    Backends decode without special tokens, but a model can still write the characters of another model's special
    tokens (`<|im_end|>` is plain text to a Llama tokenizer); left in, they would open or close turns in the reader's
    chat template.

    Args:
        text (`str`):
            Text written by one agent.
        *tokenizers:
            The writer's and the reader's tokenizers.

    Returns:
        `str`: the text without those token strings.
    """
    tokens = set().union(*(_special_tokens(tokenizer) for tokenizer in tokenizers))
    if not tokens:
        return text
    # Longest first, so that a token containing another is removed whole.
    pattern = "|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True))
    return re.sub(pattern, "", text)


def truncate_to_tokens(text: str, tokenizer: Any, max_tokens: int) -> str:
    """
    Cut a text to at most `max_tokens` tokens of `tokenizer`, marking the cut with [`TRUNCATION_MARKER`].

    The beginning (three quarters of the budget) and the end (one quarter) are kept: a long solution states its
    approach first and its answer last, and both matter to the reader. The marker is not counted in the budget.

    Args:
        text (`str`):
            The text.
        tokenizer:
            The reading agent's tokenizer (the budget is in its tokens).
        max_tokens (`int`):
            Token budget.

    Returns:
        `str`: `text` unchanged if it fits, else head, marker and tail.
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    num_tail = max_tokens // 4
    num_head = max_tokens - num_tail
    head = tokenizer.decode(ids[:num_head], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - num_tail :], skip_special_tokens=True) if num_tail else ""
    return f"{head.rstrip()}\n{TRUNCATION_MARKER}\n{tail.lstrip()}".rstrip()


def _block(label: str, end_label: str, text: str) -> str:
    # Explicit start and end lines: the texts themselves contain markdown headings and code fences.
    return f"[{label}]\n{text.strip() or '(empty)'}\n[{end_label}]"


class _TextRelay:
    """Prepares the text one agent wrote for the prompt of another (or its own later prompt)."""

    def __init__(self, agents: Sequence[GenerationBackend], max_tokens: int):
        self.agents = agents
        self.max_tokens = max_tokens

    def prepare(self, text: str, writer: int, reader: int) -> str:
        writer_tokenizer, reader_tokenizer = self.agents[writer].tokenizer, self.agents[reader].tokenizer
        text = strip_special_tokens(text, writer_tokenizer, reader_tokenizer)
        return truncate_to_tokens(text, reader_tokenizer, self.max_tokens)

    def own_and_peer_blocks(self, texts: Sequence[str], reader: int, kind: str) -> tuple[str, str]:
        """The reader's own text and its peers' texts (numbered, delimited), e.g. kind = "solution"."""
        own_text = self.prepare(texts[reader], reader, reader)
        own = _block(f"Your {kind} (Agent {reader + 1})", f"End of your {kind}", own_text)
        peers = "\n\n".join(
            _block(
                f"Agent {writer + 1}'s {kind}",
                f"End of Agent {writer + 1}'s {kind}",
                self.prepare(texts[writer], writer, reader),
            )
            for writer in range(len(texts))
            if writer != reader
        )
        return own, peers


# ---------------------------------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------------------------------
def run_idea3(
    questions: list[dict[str, Any]],
    agents: list[GenerationBackend],
    cooperate: np.ndarray | list[list[bool]],
    settings: Idea3Settings,
    *,
    rng: np.random.Generator | None = None,
) -> Transcript:
    """
    Run Idea3 (share -> analyse -> fuse) over a batch of questions, one `generate` call per stage and agent.

    Args:
        questions (`list[dict]`):
            Canonical questions (`problem`, `task`, ...; see `ilr.data`).
        agents (`list[GenerationBackend]`):
            The m >= 2 agents, with distinct names.
        cooperate (`np.ndarray` or `list[list[bool]]`):
            Shape `[num_questions, num_agents]`: `True` frames agent i's analysis and fusion for question q as
            cooperation, `False` as competition.
        settings ([`Idea3Settings`]):
            Sampling and prompt settings.
        rng (`np.random.Generator`, *optional*):
            Draws the shared samples and the generation seeds; defaults to `np.random.default_rng(settings.seed)`.

    Returns:
        [`Transcript`]: stages `share`, `analyse`, `fuse`; the fuse groups hold the final answers.
    """
    _check_inputs(questions, agents, min_agents=2)
    coop_mask = np.asarray(cooperate, dtype=bool)
    if coop_mask.shape != (len(questions), len(agents)):
        raise ValueError(
            f"`cooperate` must have shape [num_questions, num_agents] = {[len(questions), len(agents)]} "
            f"(got {list(coop_mask.shape)})."
        )
    rng = np.random.default_rng(settings.seed) if rng is None else rng
    transcript = _new_transcript("idea3", questions, agents, settings, cooperate=coop_mask)
    relay = _TextRelay(agents, settings.peer_max_tokens)
    modes = np.where(coop_mask, "cooperate", "compete")
    answer_params = _sampling_params(settings, settings.num_generations, settings.max_completion_length)
    analysis_params = _sampling_params(settings, settings.analysis_samples, settings.max_analysis_length)
    fuse_params = _sampling_params(settings, settings.fuse_samples, settings.max_completion_length)

    # Share: the plain single-agent prompt, identical to the evaluation prompt.
    share_prompts = [_single_prompt(question, settings) for question in questions]
    for i, agent in enumerate(agents):
        _run_stage(transcript, "share", i, agent, share_prompts, answer_params, rng)
    ideas = _select_shown(transcript, "share", settings.share_selection, rng)

    # Analyse: each agent reads its own idea and its peers' ideas, framed by its own mode for the question.
    for i, agent in enumerate(agents):
        prompts = []
        for q, question in enumerate(questions):
            own_idea, peer_ideas = relay.own_and_peer_blocks(ideas[q], i, "solution")
            fields = {"own_idea": own_idea, "peer_ideas": peer_ideas}
            prompts.append(_stage_prompt(question, "analyse", modes[q, i], i, len(agents), fields, settings))
        _run_stage(transcript, "analyse", i, agent, prompts, analysis_params, rng, modes=modes[:, i])
    analyses = _select_shown(transcript, "analyse", "first", rng)

    # Fuse: every idea and every shown analysis; all samples of a question share this one prompt.
    for i, agent in enumerate(agents):
        prompts = []
        for q, question in enumerate(questions):
            own_idea, peer_ideas = relay.own_and_peer_blocks(ideas[q], i, "solution")
            own_analysis, peer_analyses = relay.own_and_peer_blocks(analyses[q], i, "analysis")
            fields = {
                "own_idea": own_idea,
                "peer_ideas": peer_ideas,
                "own_analysis": own_analysis,
                "peer_analyses": peer_analyses,
            }
            prompts.append(_stage_prompt(question, "fuse", modes[q, i], i, len(agents), fields, settings))
        _run_stage(transcript, "fuse", i, agent, prompts, fuse_params, rng, modes=modes[:, i])
    return transcript


def run_debate(
    questions: list[dict[str, Any]],
    agents: list[GenerationBackend],
    settings: Idea3Settings,
    rounds: int = 2,
    *,
    rng: np.random.Generator | None = None,
) -> Transcript:
    """
    Multi-agent debate: round 0 each agent answers alone, then in each of `rounds` rounds every agent reads the
    others' answers from the previous round and updates its own. One `generate` call per round and agent.

    Args:
        questions (`list[dict]`):
            Canonical questions.
        agents (`list[GenerationBackend]`):
            The m >= 2 agents, with distinct names.
        settings ([`Idea3Settings`]):
            Sampling settings (`num_generations` samples per round; the one passed on follows `share_selection`).
        rounds (`int`, *optional*, defaults to `2`):
            Update rounds after round 0 (R >= 0; R + 1 calls per agent).
        rng (`np.random.Generator`, *optional*):
            Draws the passed-on samples and the generation seeds; defaults to `np.random.default_rng(settings.seed)`.

    Returns:
        [`Transcript`]: stages `round_0` .. `round_<rounds>`; the last holds the final answers.
    """
    _check_inputs(questions, agents, min_agents=2)
    if rounds < 0:
        raise ValueError(f"`rounds` must be >= 0 (got {rounds}).")
    rng = np.random.default_rng(settings.seed) if rng is None else rng
    transcript = _new_transcript("debate", questions, agents, settings)
    relay = _TextRelay(agents, settings.peer_max_tokens)
    params = _sampling_params(settings, settings.num_generations, settings.max_completion_length)

    first_prompts = [_single_prompt(question, settings) for question in questions]
    for i, agent in enumerate(agents):
        _run_stage(transcript, "round_0", i, agent, first_prompts, params, rng)
    for round_index in range(1, rounds + 1):
        previous = _select_shown(transcript, f"round_{round_index - 1}", settings.share_selection, rng)
        for i, agent in enumerate(agents):
            prompts = []
            for q, question in enumerate(questions):
                own_answer, peer_answers = relay.own_and_peer_blocks(previous[q], i, "answer")
                fields = {"own_answer": own_answer, "peer_answers": peer_answers}
                prompts.append(_stage_prompt(question, "debate", None, i, len(agents), fields, settings))
            _run_stage(transcript, f"round_{round_index}", i, agent, prompts, params, rng)
    return transcript


def run_single(
    questions: list[dict[str, Any]],
    agents: list[GenerationBackend],
    settings: Idea3Settings,
    *,
    rng: np.random.Generator | None = None,
) -> Transcript:
    """
    Each agent answers every question alone with the plain single-agent prompt (the evaluation setting), one
    `generate` call per agent.

    Args:
        questions (`list[dict]`):
            Canonical questions.
        agents (`list[GenerationBackend]`):
            One or more agents, with distinct names.
        settings ([`Idea3Settings`]):
            Sampling settings (`num_generations` samples per question).
        rng (`np.random.Generator`, *optional*):
            Draws the generation seeds; defaults to `np.random.default_rng(settings.seed)`.

    Returns:
        [`Transcript`]: the single stage `answer`.
    """
    _check_inputs(questions, agents, min_agents=1)
    rng = np.random.default_rng(settings.seed) if rng is None else rng
    transcript = _new_transcript("single", questions, agents, settings)
    params = _sampling_params(settings, settings.num_generations, settings.max_completion_length)
    prompts = [_single_prompt(question, settings) for question in questions]
    for i, agent in enumerate(agents):
        _run_stage(transcript, SINGLE_STAGE, i, agent, prompts, params, rng)
    return transcript


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def _check_inputs(questions: list[dict[str, Any]], agents: list[GenerationBackend], *, min_agents: int) -> None:
    if not questions:
        raise ValueError("No questions: pass at least one question.")
    if len(agents) < min_agents:
        raise ValueError(f"This protocol needs at least {min_agents} agents (got {len(agents)}).")
    names = [agent.name for agent in agents]
    if len(set(names)) != len(names):
        raise ValueError(f"Agent names must be distinct (got {names}); give each agent its own `name`.")
    for q, question in enumerate(questions):
        task = question.get("task", "math")
        if task not in _TASKS:
            raise ValueError(f"Question {q} has task {task!r}; expected one of {list(_TASKS)}.")


def _new_transcript(
    protocol: str,
    questions: list[dict[str, Any]],
    agents: list[GenerationBackend],
    settings: Idea3Settings,
    *,
    cooperate: np.ndarray | None = None,
) -> Transcript:
    return Transcript(
        protocol=protocol,
        questions=[dict(question) for question in questions],
        agent_names=[agent.name for agent in agents],
        cooperate=cooperate,
        settings=dataclasses.asdict(settings),
    )


def _sampling_params(settings: Idea3Settings, n: int, max_new_tokens: int) -> SamplingParams:
    return SamplingParams(
        n=n,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        max_new_tokens=max_new_tokens,
    )


def _single_prompt(question: dict[str, Any], settings: Idea3Settings) -> Messages:
    return build_prompt(question, system_prompt=settings.system_prompt)


def _stage_prompt(
    question: dict[str, Any],
    stage: str,
    mode: str | None,
    agent: int,
    num_agents: int,
    fields: dict[str, str],
    settings: Idea3Settings,
) -> Messages:
    """One user turn from the `<task>_<stage>[_<mode>]` template, e.g. `math_analyse_compete`."""
    task = question.get("task", "math")
    template = f"{task}_{stage}" + (f"_{mode}" if mode else "")
    # Like `build_prompt`: the question's text fields fill placeholders, the gold answer never does.
    question_fields = {k: v for k, v in question.items() if isinstance(v, str) and k != "answer"}
    content = render(template, **{**question_fields, **fields, "agent_id": agent + 1, "num_agents": num_agents})
    messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    messages.append({"role": "user", "content": content})
    return messages


def _run_stage(
    transcript: Transcript,
    stage: str,
    agent_index: int,
    agent: GenerationBackend,
    prompts: list[Messages],
    params: SamplingParams,
    rng: np.random.Generator,
    *,
    modes: Sequence[str] | None = None,
) -> None:
    """One `generate` call of one agent over every question of a stage; records its groups and usage."""
    # A fresh seed per call, drawn from the protocol's rng: reproducible, and not the same noise in every stage.
    params = dataclasses.replace(params, seed=int(rng.integers(2**31 - 1)))
    start = time.perf_counter()
    output = agent.generate(prompts, params)
    seconds = time.perf_counter() - start
    _check_output(output, agent, prompts, params)

    groups = [
        Group(
            agent=agent_index,
            stage=stage,
            question=q,
            mode=None if modes is None else str(modes[q]),
            prompt=prompt,
            prompt_ids=list(output.prompt_ids[q]),
            completion_ids=[list(c.token_ids) for c in completions],
            logprobs=[[float(x) for x in c.logprobs] for c in completions],
            texts=[c.text for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
        )
        for q, (prompt, completions) in enumerate(zip(prompts, output.completions))
    ]
    if stage not in transcript.groups:
        transcript.stages.append(stage)
        transcript.groups[stage] = [[] for _ in transcript.agent_names]
        transcript.usage[stage] = [StageUsage() for _ in transcript.agent_names]
    transcript.groups[stage][agent_index] = groups
    usage = transcript.usage[stage][agent_index]
    usage.calls += 1
    usage.prompts += len(prompts)
    usage.completions += len(prompts) * params.n
    usage.prompt_tokens += output.num_prompt_tokens
    usage.generated_tokens += output.num_generated_tokens
    usage.seconds += seconds


def _check_output(
    output: GenerationOutput, agent: GenerationBackend, prompts: list[Messages], params: SamplingParams
) -> None:
    # Groups are built by position: a backend that drops or reorders anything would silently mix questions.
    if len(output.prompt_ids) != len(prompts) or len(output.completions) != len(prompts):
        raise RuntimeError(
            f"Backend {agent.name!r} returned {len(output.completions)} completion lists and "
            f"{len(output.prompt_ids)} prompt ids for {len(prompts)} prompts."
        )
    for completions in output.completions:
        if len(completions) != params.n:
            raise RuntimeError(
                f"Backend {agent.name!r} returned {len(completions)} completions, expected n={params.n}."
            )


def _select_shown(transcript: Transcript, stage: str, selection: str, rng: np.random.Generator) -> list[list[str]]:
    """Marks the sample each agent shows its peers and returns those texts as `[question][agent]`."""
    rows = transcript.groups[stage]
    num_samples = rows[0][0].num_samples
    if selection == "random":
        chosen = rng.integers(num_samples, size=(transcript.num_questions, transcript.num_agents))
    else:
        chosen = np.zeros((transcript.num_questions, transcript.num_agents), dtype=int)
    shown = []
    for q in range(transcript.num_questions):
        for agent in range(transcript.num_agents):
            rows[agent][q].selected = int(chosen[q, agent])
        shown.append([rows[agent][q].texts[int(chosen[q, agent])] for agent in range(transcript.num_agents)])
    return shown


def _jsonable(value: Any) -> Any:
    """Nested dicts, lists and scalars only (numpy arrays and scalars, tuples converted)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
