// Units: how the vmm command prints sizes. MiB with one decimal everywhere, so columns line up; a
// negative size that means "unknown" (the host RSS where /proc is missing) prints as n/a.
namespace Vmm.Cli;

internal static class Units
{
    public const long MiB = 1L << 20;

    /// <summary>Bytes as "12.3 MiB" (signed: a profit can be negative).</summary>
    public static string Mib(long bytes) => $"{bytes / (double)MiB:N1} MiB";

    /// <summary>A change in bytes, with its sign: "+1.5 MiB", "-0.3 MiB".</summary>
    public static string SignedMib(long bytes) => (bytes > 0 ? "+" : "") + Mib(bytes);

    /// <summary>A host RSS reading: -1 (unknown) prints as n/a.</summary>
    public static string Rss(long bytes) => bytes < 0 ? "n/a" : Mib(bytes);
}
