// Machine.Compaction: the /proc views of free memory by order (buddyinfo, pagetypeinfo), what one
// looks at before and after compaction (Linux's mm/vmstat.c: frag_show, pagetypeinfo_show).
//
// Locking: each zone's free-list counts are read under its zone lock (one zone at a time); the
// pageblock types racily (they change under the zone lock of their zone, which the count holds).
using System.Globalization;
using System.Text;
using Vmm.Memory;

namespace Vmm;

public sealed partial class Machine
{
    /// <summary>
    /// /proc/buddyinfo: per node and zone with memory, the number of free blocks of each order 0 to the
    /// zone's largest ("Node 0, zone   Normal      3      1 ..."). Free frames on per-CPU lists are in
    /// no order (as in Linux); never-initialised sections count as free blocks of the largest order.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public string ReadBuddyInfo()
    {
        using MachineCall call = EnterCall();
        var text = new StringBuilder();
        foreach (Zone zone in Allocator.Zones)
        {
            if (zone.ManagedPages == 0)
                continue;
            long[] counts = FreeCountsByOrder(zone, out _);
            text.Append(CultureInfo.InvariantCulture, $"Node {zone.Node}, zone {ZoneName(zone),8} ");
            foreach (long count in counts)
                text.Append(CultureInfo.InvariantCulture, $"{count,6} ");
            text.Append('\n');
        }
        return text.ToString();
    }

    /// <summary>
    /// /proc/pagetypeinfo: the pageblock order and size; per node, zone and migratetype (Unmovable,
    /// Movable, Isolate: the ones Vmm has) the number of free blocks of each order; then per node and
    /// zone the number of pageblocks of each migratetype.
    /// </summary>
    /// <exception cref="ObjectDisposedException">the machine was disposed.</exception>
    public string ReadPageTypeInfo()
    {
        using MachineCall call = EnterCall();
        string[] typeNames = [.. Enumerable.Range(0, Zone.MigrateTypeCount).Select(t => ((MigrateType)t).ToString())];
        var text = new StringBuilder();
        text.Append(CultureInfo.InvariantCulture, $"Page block order: {PageAllocator.PageblockOrder}\n");
        text.Append(CultureInfo.InvariantCulture, $"Pages per block:  {PageAllocator.PageblockFrames}\n\n");
        var zones = Allocator.Zones.Where(z => z.ManagedPages != 0).ToList();
        int maxOrder = zones.Count == 0 ? PageAllocator.MaxOrder : zones.Max(z => z.MaxOrder);
        text.Append(CultureInfo.InvariantCulture, $"{"Free pages count per migrate type at order",-43} ");
        for (int order = 0; order <= maxOrder; order++)
            text.Append(CultureInfo.InvariantCulture, $"{order,6} ");
        text.Append('\n');
        foreach (Zone zone in zones)
        {
            FreeCountsByOrder(zone, out long[,] byType);
            for (int t = 0; t < Zone.MigrateTypeCount; t++)
            {
                text.Append(CultureInfo.InvariantCulture, $"Node {zone.Node,4}, zone {ZoneName(zone),8}, type {typeNames[t],12} ");
                for (int order = 0; order <= zone.MaxOrder; order++)
                    text.Append(CultureInfo.InvariantCulture, $"{byType[t, order],6} ");
                text.Append('\n');
            }
        }
        text.Append(CultureInfo.InvariantCulture, $"\n{"Number of blocks type ",-23}");
        foreach (string name in typeNames)
            text.Append(CultureInfo.InvariantCulture, $"{name,12} ");
        text.Append('\n');
        foreach (Zone zone in zones)
        {
            long[] blocks = PageblocksByType(zone);
            text.Append(CultureInfo.InvariantCulture, $"Node {zone.Node}, zone {ZoneName(zone),8} ");
            foreach (long count in blocks)
                text.Append(CultureInfo.InvariantCulture, $"{count,12} ");
            text.Append('\n');
        }
        return text.ToString();
    }

    private static string ZoneName(Zone zone) => zone.Type == ZoneType.Normal ? "Normal" : "Movable";

    /// <summary>Free blocks per order (all types), and per type and order; deferred sections as MOVABLE max-order blocks.</summary>
    private static long[] FreeCountsByOrder(Zone zone, out long[,] byType)
    {
        var counts = new long[zone.MaxOrder + 1];
        byType = new long[Zone.MigrateTypeCount, zone.MaxOrder + 1];
        lock (zone.Lock)
        {
            for (int order = 0; order <= zone.MaxOrder; order++)
            {
                for (int t = 0; t < Zone.MigrateTypeCount; t++)
                {
                    long n = zone.NrFree[Zone.ListIndex(order, (MigrateType)t)];
                    byType[t, order] = n;
                    counts[order] += n;
                }
            }
            long deferred = zone.DeferredPages >> zone.MaxOrder;
            counts[zone.MaxOrder] += deferred;
            byType[(int)MigrateType.Movable, zone.MaxOrder] += deferred;
        }
        return counts;
    }

    /// <summary>Pageblocks of the zone's online blocks, by migratetype.</summary>
    private long[] PageblocksByType(Zone zone)
    {
        var counts = new long[Zone.MigrateTypeCount];
        long start = zone.StartPfn & ~(long)(PageAllocator.PageblockFrames - 1);
        for (long pfn = start; pfn < zone.EndPfn; pfn += PageAllocator.PageblockFrames)
        {
            if (Allocator.PageblockInZone(zone, pfn))
                counts[(int)Allocator.PageblockTypeOf(pfn)]++;
        }
        return counts;
    }
}
