//! The restaurant order of the second seed's post on API design, as a saga with the
//! optimistic persister: diners add items concurrently (conflicts re-run on fresh state),
//! submitting to the kitchen is a boundary (an item added later waits for the next
//! submission), the bill computes bundles once, and one payment request carries several parts
//! — a declined card leaves the rest paid and asks for a second submission for the remainder.

use async_trait::async_trait;
use rhinobus::{HandlerError, Message};
use rhinobus_sagas::{InitiatedBy, Orchestrates, Routes, Saga, SagaContext};
use serde::{Deserialize, Serialize};

macro_rules! message {
    ($t:ident, $name:literal) => {
        impl Message for $t {
            const NAME: &'static str = $name;
        }
    };
}

/// The queue kitchen tickets go to.
pub const KITCHEN: &str = "kitchen";
/// The queue card charges go to.
pub const CARD_PROCESSOR: &str = "card-processor";

/// Opens an order for a table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenOrder {
    /// The order.
    pub order: String,
}
message!(OpenOrder, "restaurant.open-order");

/// A diner adds dishes (each with a unique item id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddItems {
    /// The order.
    pub order: String,
    /// Who ordered.
    pub diner: String,
    /// `(item id, dish)`.
    pub items: Vec<(String, String)>,
}
message!(AddItems, "restaurant.add-items");

/// Sends every pending item to the kitchen.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitToKitchen {
    /// The order.
    pub order: String,
}
message!(SubmitToKitchen, "restaurant.submit-to-kitchen");

/// What the kitchen gets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KitchenTicket {
    /// The order.
    pub order: String,
    /// The dishes to cook.
    pub dishes: Vec<String>,
}
message!(KitchenTicket, "restaurant.kitchen-ticket");

/// Closes the order and asks for the total.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestBill {
    /// The order.
    pub order: String,
}
message!(RequestBill, "restaurant.request-bill");

/// The reply to [`RequestBill`]: the final tally.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BillReady {
    /// The order.
    pub order: String,
    /// Lines of the bill, bundles included.
    pub lines: Vec<(String, i64)>,
    /// The total, in dollars.
    pub total: i64,
}
message!(BillReady, "restaurant.bill-ready");

/// How one part of a payment is made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentMethod {
    /// Cash at the table.
    Cash,
    /// A credit card.
    Card {
        /// The masked number.
        number: String,
    },
}

/// One part of a payment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentPart {
    /// Dollars.
    pub amount: i64,
    /// How.
    pub method: PaymentMethod,
}

/// One payment request with all its parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PayBill {
    /// The order.
    pub order: String,
    /// The parts.
    pub payments: Vec<PaymentPart>,
}
message!(PayBill, "restaurant.pay-bill");

/// Asks the card processor to charge a card.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChargeCard {
    /// The order.
    pub order: String,
    /// Which part of which payment request: `"<request>/<part>"`.
    pub part: String,
    /// The card.
    pub card: String,
    /// Dollars.
    pub amount: i64,
}
message!(ChargeCard, "restaurant.charge-card");

/// The card processor's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CardCharged {
    /// The order.
    pub order: String,
    /// The part, as in [`ChargeCard`].
    pub part: String,
    /// Whether the charge went through.
    pub approved: bool,
}
message!(CardCharged, "restaurant.card-charged");

/// Published when a payment request ends with part of the bill unpaid.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PaymentIncomplete {
    /// The order.
    pub order: String,
    /// Paid so far.
    pub paid: i64,
    /// Still due: submit another payment for it.
    pub remaining: i64,
}
message!(PaymentIncomplete, "restaurant.payment-incomplete");

/// Published when the bill is paid in full; the saga completes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPaid {
    /// The order.
    pub order: String,
    /// The total paid.
    pub total: i64,
}
message!(OrderPaid, "restaurant.order-paid");

/// The price of a dish in dollars (unknown dishes cost 10$).
pub fn price(dish: &str) -> i64 {
    match dish {
        "salad" => 8,
        "juice" => 4,
        "omelet" => 12,
        "coffee" => 3,
        "cake" => 6,
        _ => 10,
    }
}

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Items may be added and submitted.
    #[default]
    Ordering,
    /// The bill was computed; only payments now.
    Billed,
}

/// The state of one order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Order {
    /// Where it is.
    pub stage: Stage,
    /// `(item id, diner, dish)` not yet sent to the kitchen.
    pub pending: Vec<(String, String, String)>,
    /// Sent to the kitchen.
    pub submitted: Vec<(String, String, String)>,
    /// The final tally, once billed.
    pub total: i64,
    /// Paid so far.
    pub paid: i64,
    /// Card charges waiting for an answer: part → amount.
    pub charging: Vec<(String, i64)>,
    /// Payment requests handled, to number their parts.
    pub payment_requests: u32,
}

/// The order saga.
#[derive(Debug, Clone, Copy, Default)]
pub struct OrderSaga;

impl Saga for OrderSaga {
    const NAME: &'static str = "restaurant.order";
    type State = Order;
    type Key = String;

    fn routes(r: &mut Routes<Self>) {
        r.initiated_by::<OpenOrder>()
            .orchestrates::<AddItems>()
            .orchestrates::<SubmitToKitchen>()
            .orchestrates::<RequestBill>()
            .orchestrates::<PayBill>()
            .orchestrates::<CardCharged>();
    }
}

/// The bill of `items`: one line per dish, and the bundles: salad & juice for 10$, coffee free
/// with an omelet.
pub fn bill(items: &[(String, String, String)]) -> (Vec<(String, i64)>, i64) {
    let mut lines: Vec<(String, i64)> = items
        .iter()
        .map(|(_, diner, dish)| (format!("{dish} ({diner})"), price(dish)))
        .collect();
    let count = |d: &str| items.iter().filter(|(_, _, dish)| dish == d).count() as i64;
    let salad_juice = count("salad").min(count("juice"));
    if salad_juice > 0 {
        lines.push(("bundle: salad & juice".into(), -2 * salad_juice));
    }
    let omelet_coffee = count("omelet").min(count("coffee"));
    if omelet_coffee > 0 {
        lines.push((
            "bundle: coffee with the omelet".into(),
            -price("coffee") * omelet_coffee,
        ));
    }
    let total = lines.iter().map(|(_, p)| p).sum();
    (lines, total)
}

#[async_trait]
impl InitiatedBy<OpenOrder> for OrderSaga {
    fn correlate(m: &OpenOrder) -> String {
        m.order.clone()
    }
    async fn handle(&self, _: OpenOrder, _: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[async_trait]
impl Orchestrates<AddItems> for OrderSaga {
    fn correlate(m: &AddItems) -> String {
        m.order.clone()
    }
    async fn handle(&self, m: AddItems, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        if saga.state.stage != Stage::Ordering {
            return Err(HandlerError::msg(format!(
                "order {} is billed; no more items",
                m.order
            )));
        }
        for (id, dish) in m.items {
            saga.state.pending.push((id, m.diner.clone(), dish));
        }
        Ok(())
    }
}

#[async_trait]
impl Orchestrates<SubmitToKitchen> for OrderSaga {
    fn correlate(m: &SubmitToKitchen) -> String {
        m.order.clone()
    }
    async fn handle(
        &self,
        m: SubmitToKitchen,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        let mut batch = std::mem::take(&mut saga.state.pending);
        if batch.is_empty() {
            return Ok(());
        }
        batch.sort();
        let dishes = batch.iter().map(|(_, _, dish)| dish.clone()).collect();
        saga.send(
            KITCHEN,
            &KitchenTicket {
                order: m.order,
                dishes,
            },
        )?;
        saga.state.submitted.extend(batch);
        Ok(())
    }
}

#[async_trait]
impl Orchestrates<RequestBill> for OrderSaga {
    fn correlate(m: &RequestBill) -> String {
        m.order.clone()
    }
    async fn handle(
        &self,
        m: RequestBill,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        let mut items = saga.state.submitted.clone();
        items.sort();
        let (lines, total) = bill(&items);
        saga.state.stage = Stage::Billed;
        saga.state.total = total;
        saga.reply(&BillReady {
            order: m.order,
            lines,
            total,
        })?;
        Ok(())
    }
}

#[async_trait]
impl Orchestrates<PayBill> for OrderSaga {
    fn correlate(m: &PayBill) -> String {
        m.order.clone()
    }
    async fn handle(&self, m: PayBill, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        if saga.state.stage != Stage::Billed {
            return Err(HandlerError::msg(format!(
                "order {} has no bill yet",
                m.order
            )));
        }
        saga.state.payment_requests += 1;
        let request = saga.state.payment_requests;
        for (i, part) in m.payments.into_iter().enumerate() {
            match part.method {
                PaymentMethod::Cash => saga.state.paid += part.amount,
                PaymentMethod::Card { number } => {
                    let part_id = format!("{request}/{i}");
                    saga.state.charging.push((part_id.clone(), part.amount));
                    saga.send(
                        CARD_PROCESSOR,
                        &ChargeCard {
                            order: m.order.clone(),
                            part: part_id,
                            card: number,
                            amount: part.amount,
                        },
                    )?;
                }
            }
        }
        settle(saga, &m.order)
    }
}

#[async_trait]
impl Orchestrates<CardCharged> for OrderSaga {
    fn correlate(m: &CardCharged) -> String {
        m.order.clone()
    }
    async fn handle(
        &self,
        m: CardCharged,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        let Some(at) = saga.state.charging.iter().position(|(p, _)| *p == m.part) else {
            return Ok(());
        };
        let (_, amount) = saga.state.charging.remove(at);
        if m.approved {
            saga.state.paid += amount;
        }
        settle(saga, &m.order)
    }
}

/// Once no charge is outstanding: paid in full completes the order; anything less is a partial
/// failure, and the diners submit another payment for the remainder.
fn settle(saga: &mut SagaContext<OrderSaga>, order: &str) -> Result<(), HandlerError> {
    if !saga.state.charging.is_empty() {
        return Ok(());
    }
    let (paid, total) = (saga.state.paid, saga.state.total);
    if paid >= total {
        saga.publish(&OrderPaid {
            order: order.into(),
            total: paid,
        })?;
        saga.complete();
    } else {
        saga.publish(&PaymentIncomplete {
            order: order.into(),
            paid,
            remaining: total - paid,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhinobus_sagas::SagaHarness;

    #[test]
    fn bundles_apply_once_per_pair() {
        let item = |d: &str| (d.to_string(), "x".to_string(), d.to_string());
        let (_, total) = bill(&[item("salad"), item("juice"), item("omelet"), item("coffee")]);
        assert_eq!(total, 10 + 12);
    }

    #[tokio::test]
    async fn a_declined_card_leaves_the_rest_paid_and_asks_for_the_remainder() {
        let h = SagaHarness::new(OrderSaga);
        let order = "7".to_string();
        h.handle(&OpenOrder {
            order: order.clone(),
        })
        .await
        .unwrap();
        let add = AddItems {
            order: order.clone(),
            diner: "jane".into(),
            items: vec![("1".into(), "omelet".into())],
        };
        h.handle(&add).await.unwrap();
        let sent = h
            .handle(&SubmitToKitchen {
                order: order.clone(),
            })
            .await
            .unwrap();
        assert_eq!(sent[0].queue(), Some(KITCHEN));
        let sent = h
            .handle(&RequestBill {
                order: order.clone(),
            })
            .await
            .unwrap();
        assert_eq!(sent[0].decode::<BillReady>().map(|b| b.total), Some(12));
        let card = |n: &str| PaymentMethod::Card { number: n.into() };
        let pay = PayBill {
            order: order.clone(),
            payments: vec![
                PaymentPart {
                    amount: 5,
                    method: PaymentMethod::Cash,
                },
                PaymentPart {
                    amount: 7,
                    method: card("5678"),
                },
            ],
        };
        let sent = h.handle(&pay).await.unwrap();
        let charge = sent[0].decode::<ChargeCard>().unwrap();
        let sent = h
            .handle(&CardCharged {
                order: order.clone(),
                part: charge.part,
                approved: false,
            })
            .await
            .unwrap();
        assert_eq!(
            sent[0].decode::<PaymentIncomplete>().map(|p| p.remaining),
            Some(7)
        );
        let pay = PayBill {
            order: order.clone(),
            payments: vec![PaymentPart {
                amount: 7,
                method: PaymentMethod::Cash,
            }],
        };
        let sent = h.handle(&pay).await.unwrap();
        assert!(sent[0].decode::<OrderPaid>().is_some());
        assert!(h.is_completed(&order).await.unwrap());
    }
}
