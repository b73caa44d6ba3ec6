"""Only the optional C extension lives here; everything else is in pyproject.toml. Without a C compiler the
install still succeeds and autosdpa uses its Python fast key (``autosdpa doctor`` says which)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("autosdpa._fastkey", ["autosdpa/_fastkey.c"], optional=True)])
