"""Routing learners: policies that pick a route among the allowed arms (the contract:
``decision.contracts.Learner``; the names and parameters a config can use: ``learners.registry``)."""
