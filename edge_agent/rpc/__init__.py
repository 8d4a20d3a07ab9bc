"""gRPC plumbing shared by the agent's listeners and the control plane's: lenient request
parsing (wire), the one mapping of our exceptions to a gRPC status (status), connection hygiene
(connections) and listen-address checks (listen). Nothing here knows a model or a device."""
