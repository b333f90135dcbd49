"""The cost report (``ftserve cost``): $ per 1M tokens when self-hosting, and the break-even against APIs."""
