"""serve: a local vLLM OpenAI-compatible server, one client interface over OpenAI and local, comparison, UI."""
