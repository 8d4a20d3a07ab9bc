"""What the agent, the control plane and the publisher share: the release format, signing,
tokens and the client side of the fleet protocol (protos/edge_agent/_proto/fleet.proto)."""
