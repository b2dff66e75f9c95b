import tunekit  # noqa: F401 (first: it quiets bitsandbytes' import-time warning before transformers loads it)
