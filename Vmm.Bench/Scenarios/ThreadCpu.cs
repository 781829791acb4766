using System.Runtime.InteropServices;

namespace Vmm.Bench.Scenarios;

/// <summary>
/// The calling thread's CPU time (clock_gettime(CLOCK_THREAD_CPUTIME_ID), Linux): beside the wall
/// clock, what a call cost in CPU when the machine is shared and the thread waits for a core.
/// </summary>
internal static partial class ThreadCpu
{
    private const int ClockThreadCpuTimeId = 3;

    [StructLayout(LayoutKind.Sequential)]
    private struct Timespec
    {
        public long Seconds;
        public long Nanoseconds;
    }

    [LibraryImport("libc", EntryPoint = "clock_gettime")]
    private static partial int ClockGetTime(int clock, out Timespec time);

    /// <summary>The thread's CPU time in ns, or NaN where the clock does not exist.</summary>
    public static double Nanoseconds()
    {
        if (!OperatingSystem.IsLinux() || ClockGetTime(ClockThreadCpuTimeId, out Timespec t) != 0)
            return double.NaN;
        return t.Seconds * 1e9 + t.Nanoseconds;
    }
}
