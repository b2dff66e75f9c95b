"""What every grader shares: the types, operations and metrics it names, OpenAI's ``metadata.errors`` flags,
the refusal (``GraderInvalid``) and the result of one grade (``GradeResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")
OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = ("cosine", "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
           "rouge_5", "rouge_l")
EMBEDDING_ENV = "TUNEKIT_GRADER_EMBEDDING_MODEL"
ERROR_FLAGS = ("formula_parse_error", "sample_parse_error", "truncated_observation_error",
               "unresponsive_reward_error", "invalid_variable_error", "other_error", "python_grader_server_error",
               "python_grader_server_error_type", "python_grader_runtime_error", "python_grader_runtime_error_details",
               "model_grader_server_error", "model_grader_refusal_error", "model_grader_parse_error",
               "model_grader_server_error_details")
_DETAILS = {"python_grader_server_error_type", "python_grader_runtime_error_details", "model_grader_server_error_details"}


def error_flags(**set_: Any) -> dict:
    """OpenAI's ``metadata.errors``: every flag false, every details null, then ``set_``."""
    flags = {k: (None if k in _DETAILS else False) for k in ERROR_FLAGS}
    flags.update(set_)
    return flags


class GraderInvalid(ValueError):
    """A grader the API refuses (400): ``param`` is its path, e.g. ``grader.operation``."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


@dataclass
class GradeResult:
    reward: float
    sub_rewards: dict = field(default_factory=dict)
    name: str = ""
    type: str = ""
    errors: dict = field(default_factory=error_flags)
    execution_time: float = 0.0
    scores: dict = field(default_factory=dict)
    token_usage: int | None = None
    sampled_model_name: str | None = None
    usage_per_model: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(v for k, v in self.errors.items() if k not in _DETAILS)

    def metadata(self) -> dict:
        return {"name": self.name, "type": self.type, "errors": self.errors, "execution_time": self.execution_time,
                "scores": self.scores, "token_usage": self.token_usage, "sampled_model_name": self.sampled_model_name}

    def to_response(self) -> dict:
        """RunGraderResponse."""
        return {"reward": self.reward, "metadata": self.metadata(), "sub_rewards": self.sub_rewards,
                "model_grader_token_usage_per_model": self.usage_per_model}
