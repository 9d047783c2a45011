"""Generated from protos/covrl/v1 by protos/generate.py; do not edit."""
