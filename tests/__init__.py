"""The integration suites: real nats-server, listener and builder processes, nix; a package so that its shared
modules (tests.helpers, tests.fixtures) import under one name from here and from the unit suite at the root."""
