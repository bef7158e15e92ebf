"""Moved to vmhost.testing.agentproc; this name is kept for code not yet updated."""
from vmhost.testing.agentproc import RECOVERING, AgentProcess, free_port  # noqa: F401
