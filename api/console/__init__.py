"""The operator's console: a single-page app in plain JS served at ``/console`` (``ktl.api.console``)."""
