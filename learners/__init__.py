"""Routing learners: policies that pick a route among the allowed arms (DESIGN.md section 4)."""
