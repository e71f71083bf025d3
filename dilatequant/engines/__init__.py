"""Runtime side: run, build and serve exported UNet graphs."""
