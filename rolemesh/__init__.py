"""RoleMesh: run many local LLMs across many GPU hosts, routed by role."""

__version__ = "0.1.0"
