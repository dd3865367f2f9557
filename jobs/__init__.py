"""Jobs shared by the service and the workers: their settings (and, with issue 12, their models and store)."""
