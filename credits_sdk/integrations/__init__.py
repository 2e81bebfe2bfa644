"""Optional integrations with agent and LLM frameworks, each behind its own extra
(``pip install 'agent-credits[langchain]'``). Import the submodule you need."""
