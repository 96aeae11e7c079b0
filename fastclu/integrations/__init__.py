"""Integrations with training frameworks (optional dependencies, imported on demand).

``fastclu.integrations.hf``: Hugging Face ``Trainer`` (``pip install fastclu[hf]``).
``fastclu.integrations.lightning``: Lightning ``Trainer`` callbacks (``pip install lightning``).
"""
