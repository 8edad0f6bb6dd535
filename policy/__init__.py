"""The platform's policy pack: rules in plain modules (`policy.rules`, `policy.iam`), the pack in `__main__.py`."""
