# Code generated from protos/chargepath/v1 by scripts/gen-python.sh. DO NOT EDIT.
