"""Deployment helpers: TLS certificates, SuperNode keys and node-key binding for Flower's Deployment Engine."""
