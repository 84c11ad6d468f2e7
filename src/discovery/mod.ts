// Public surface of the discovery module (the auto-configuration protocol,
// docs/protocol/discovery.md and snmp.md). Other modules import from here;
// tests may reach into the files behind it.

export { DiscoveryListener, UNIT_STATES } from "./station_listener.ts";
export type { DiscoveryEvent, DiscoveryEventHandler, DiscoveryListenerOptions, DiscoveryStats, UnitState, UnitView } from "./station_listener.ts";
export { StationAgent } from "./unit_agent.ts";
export type { AgentEvent, AgentState, StationAgentOptions } from "./unit_agent.ts";
export { SnmpTrapListener, decodeTrap, OID } from "./snmp.ts";
export type { SnmpEvent, SnmpTrapEvent } from "./snmp.ts";
export { attachSnmp, fetchInfoOverControl } from "./snmp_join.ts";
export {
  CLUSTER_KEY_FILE_NAME,
  controlTokenFor,
  loadClusterKey,
  loadOrCreateClusterKey,
  parseClusterKey,
  type ClusterKey,
} from "./keys.ts";
export { validateStorageInfo } from "./storage_info.ts";
export type { HostPort, LbaExtent, PartitionInfo, RejectReason, StorageInfo, VolumeInfo } from "./messages.ts";
export { DEFAULT_LIVENESS_TIMERS, livenessTimersFromEnv, TIMER_ENV, type LivenessTimers } from "./timers.ts";
export { SimulatedUnits } from "./sim_units.ts";
