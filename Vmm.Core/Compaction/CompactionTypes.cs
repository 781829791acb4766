namespace Vmm;

/// <summary>
/// Compaction's counters, /proc/vmstat's compact_* lines (Linux's names in the parameter docs), with the
/// pages compaction migrated (pgmigrate_success / pgmigrate_fail of reason compaction).
/// </summary>
/// <remarks>Instances are immutable (each is a snapshot, never changed after the machine makes it): safe to share between threads.</remarks>
/// <param name="Stall">compact_stall: direct compactions that ran in an allocation (then either success or fail).</param>
/// <param name="Fail">compact_fail: direct compactions after which the allocation still failed.</param>
/// <param name="Success">compact_success: direct compactions after which the allocation succeeded.</param>
/// <param name="MigrateScanned">compact_migrate_scanned: frames the migrate scanners looked at (free blocks count whole).</param>
/// <param name="FreeScanned">compact_free_scanned: frames and free blocks the free scanners looked at.</param>
/// <param name="Isolated">compact_isolated: pages isolated to migrate plus free frames isolated to receive them.</param>
/// <param name="DaemonWake">compact_daemon_wake: kcompactd runs for an order a failing allocation asked for.</param>
/// <param name="DaemonMigrateScanned">compact_daemon_migrate_scanned: kcompactd's part of <paramref name="MigrateScanned"/>.</param>
/// <param name="DaemonFreeScanned">compact_daemon_free_scanned: kcompactd's part of <paramref name="FreeScanned"/>.</param>
/// <param name="PagesMigrated">pages compaction moved (pgmigrate_success of MR_COMPACTION).</param>
/// <param name="PagesFailed">pages compaction gave up on (pgmigrate_fail of MR_COMPACTION).</param>
public sealed record CompactionStats(long Stall, long Fail, long Success, long MigrateScanned, long FreeScanned, long Isolated,
    long DaemonWake, long DaemonMigrateScanned, long DaemonFreeScanned, long PagesMigrated, long PagesFailed);
