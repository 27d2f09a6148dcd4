"""An example service: a bank on keybatch, Starlette and PostgreSQL."""
