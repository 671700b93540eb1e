-- One database per service in the compose stack's PostgreSQL; each service applies its own
-- schema at start.
CREATE DATABASE payments;
CREATE DATABASE deployments;
