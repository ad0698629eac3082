"""Asterisk's side: the AudioSocket protocol and server, the ARI and AMI control links, the call
directory, and reading Asterisk's own configuration."""
