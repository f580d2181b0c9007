"""thinklab: measure how language models behave at test time."""
