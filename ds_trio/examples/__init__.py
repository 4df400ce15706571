"""Example daemons built only on ds_trio's public API."""
