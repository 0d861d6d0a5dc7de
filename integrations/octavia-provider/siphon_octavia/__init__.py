"""Octavia provider driver for Siphon.

`driver.SiphonProviderDriver` (entry point `octavia.api.drivers: siphon`)
turns Octavia API calls into siphon-control API calls; `agent.run` (entry
point `octavia.driver_agent.provider_agents: siphon`) follows
siphon-control's changes and reports statuses and statistics back to
Octavia through its driver agent.
"""
