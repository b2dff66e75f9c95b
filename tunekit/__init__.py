"""tunekit: the shared core (errors, typed configs, network checks) and the `tunekit` command."""
