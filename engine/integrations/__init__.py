"""Integrations of tta-engine with other libraries (each module imports its library lazily; a missing
optional dependency raises BackendUnavailableError with the install command)."""
