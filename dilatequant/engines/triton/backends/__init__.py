"""Python-backend model.py sources copied into generated repositories (self-contained: no dilatequant imports)."""
