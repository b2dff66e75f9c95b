"""``APIError``: a request the API refuses, sent in OpenAI's error envelope (``middleware.add_error_handlers``).

Its ``code`` follows OpenAI's: the request checks of any OpenAI endpoint (``missing_required_parameter``,
``unknown_parameter``, ``invalid_type``, ``invalid_value``, ``unsupported_value``,
``integer_below_min_value``, ``integer_above_max_value``, ``decimal_below_min_value``,
``string_above_max_length``, ``object_above_max_properties``, ``array_above_max_length``) and the
fine-tuning ones (``model_not_available``, ``invalid_file``, ``fine_tune_not_found``, ``invalid_state``,
``file_too_large``). Imported from ``service`` as before.
"""

from __future__ import annotations


class APIError(Exception):
    """A request the API refuses: sent as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
