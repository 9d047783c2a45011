"""Generated protobuf / gRPC code for the covrl.v1 contracts (see protos/)."""
