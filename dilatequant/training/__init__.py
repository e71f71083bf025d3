"""Training the shipped models (`default`, `default-cond`, `sd-digits`) and the digit classifier behind digit-FID."""
